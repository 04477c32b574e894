"""Settings of the Slurm tests: the executor submits to the one-machine cluster (`slurm_conf`), and the
nodes' `ftjobs run-attempt` gets this test's settings through the environment sbatch hands on."""

import shlex
import sys

import pytest

from models.settings import Settings


@pytest.fixture
def settings(settings: Settings, slurm_conf: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    update = {
        "executor": "slurm",
        "slurm_command": shlex.join([sys.executable, "-m", "cli"]),  # this checkout, on both "nodes"
        "checkpoint_every_steps": 2,
    }
    # `ftjobs run-attempt` on the nodes reads its settings from the environment sbatch hands on.
    monkeypatch.setenv("FTJOBS_DATABASE_URL", str(settings.database_url))
    monkeypatch.setenv("FTJOBS_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("FTJOBS_CHECKPOINT_EVERY_STEPS", "2")
    monkeypatch.setenv("FTJOBS_HEARTBEAT_SECONDS", str(settings.heartbeat_seconds))
    return settings.model_copy(update=update)
