"""A worker alone (no API process) sweeps too: a job whose wake-up never reached the broker still runs."""

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from models.db import make_engine, make_session_factory
from models.settings import Settings
from tests.conftest import RecordingDispatcher, fresh_postgres_database, make_tenant
from tests.e2e.servers import cli, distributed_env, process
from tests.jobs_helpers import TERMINAL, prompt_completion_lines
from tests.test_runner import create_job

pytestmark = pytest.mark.e2e


def test_a_lone_worker_wakes_a_job_nobody_published(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    with fresh_postgres_database() as database_url:
        env = distributed_env(
            tmp_path / "data", database_url, redis_url, reconcile_seconds=1, redispatch_seconds=1
        )
        cli("models", "add", "tiny-llama", str(tiny_model_dir), env=env)
        settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
        # Created through the app with a dispatcher that publishes nothing, as if Redis had lost the message.
        headers = make_tenant(make_session_factory(make_engine(database_url)), "local").headers
        with TestClient(create_app(settings, RecordingDispatcher()), headers=headers) as client:
            job_id = create_job(client, "tiny-llama", prompt_completion_lines(12))
            with process(["worker"], env, tmp_path / "worker.log"):
                deadline = time.monotonic() + 120
                while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in TERMINAL:
                    assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
                    time.sleep(0.5)
            assert job["status"] == "succeeded", job["error"]
