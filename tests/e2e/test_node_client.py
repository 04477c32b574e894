"""The official openai Node SDK against a real `ftjobs up`: files, a tiny job, its events and checkpoints,
models and chat completions (streamed and not), every response type-checked by `tsc --strict` against the
SDK's TypeScript types (tests/e2e/node/client.mjs), so a value they do not declare fails here."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import _unavailable
from tests.e2e.servers import cli, create_key, free_port, process
from tests.jobs_helpers import write_chat

pytestmark = pytest.mark.e2e

NODE_PROJECT = Path(__file__).parent / "node"


@pytest.fixture(scope="session")
def node_project() -> Path:
    """The Node project with its locked dependencies (`make install-dev` installs them; else done here)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        _unavailable("Node.js", FileNotFoundError("node and npm are not on the PATH"))
    if not (NODE_PROJECT / "node_modules").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_PROJECT, check=True)
    return NODE_PROJECT


def test_node_sdk_responses_fit_its_types(node_project: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {"FTJOBS_DATA_DIR": str(tmp_path / "data"), "FTJOBS_HEARTBEAT_SECONDS": "0.5"}
    cli("models", "add", "tiny-llama", str(tiny_model_dir), env=env)
    port = free_port()
    with process(["up", "--port", str(port)], env, tmp_path / "up.log", f"http://127.0.0.1:{port}/healthz"):
        sdk_env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1", "OPENAI_API_KEY": create_key(env)}
        run = subprocess.run(
            [
                "node",
                str(node_project / "client.mjs"),
                "tiny-llama",
                str(write_chat(tmp_path / "train.jsonl", 12)),
                str(write_chat(tmp_path / "valid.jsonl", 4, "validation")),
                str(tmp_path / "typed"),
            ],
            env={**os.environ, **sdk_env},
            capture_output=True,
            text=True,
            timeout=540,
        )
    assert run.returncode == 0, run.stdout + run.stderr
    typed = (tmp_path / "typed" / "responses.ts").read_text()
    # Every step was checked: the job, its pages, the model and both kinds of chat answer.
    for declaration in (
        "job: FineTuningJob",
        "events: CursorPageResponse<FineTuningJobEvent>",
        "checkpoints: CursorPageResponse<FineTuningJobCheckpoint>",
        "model: Model",
        "chat: ChatCompletion",
        "chunk0: ChatCompletionChunk",
        "completion: Completion",
    ):
        assert f"export const {declaration} =" in typed
