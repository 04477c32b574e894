"""The training child stays free of the service's web, queue and database stack."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN_ROOTS = {"sqlalchemy", "celery", "fastapi", "api"}


def test_training_child_imports_no_service_modules() -> None:
    # What the child loads: its entry point, then (once it has read the spec) the training loops.
    code = (
        "import json, sys, worker.training.__main__, worker.training.recipe,"
        " worker.training.feature_extraction; print(json.dumps(sorted(sys.modules)))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    modules = set(json.loads(result.stdout))

    assert {"worker.training.recipe", "worker.training.methods", "models.spec", "torch"} <= modules
    assert {name for name in modules if name.split(".")[0] in FORBIDDEN_ROOTS} == set()
    assert {name for name in modules if name.startswith("models.")} == {"models.spec"}
