"""A worker that cannot reach the database for longer than its lease kills its own trainer and writes
nothing more; the reconciler requeues the job and the next attempt finishes it from its checkpoint."""

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.main import create_app
from models.db import make_engine, make_session_factory, session_scope
from models.orm import Job
from models.registry import ModelRegistry
from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.conftest import RecordingDispatcher, fresh_postgres_database, make_tenant
from tests.faults.tcp_proxy import TcpProxy
from tests.jobs_helpers import chat_lines, wait_for
from tests.test_runner import create_job
from worker.reconciler import Reconciler
from worker.runner import JobRunner

pytestmark = pytest.mark.e2e


def test_worker_without_its_lease_stops_and_the_job_moves_on(tmp_path: Path, tiny_model_dir: Path) -> None:
    with fresh_postgres_database() as direct_url, TcpProxy(5432) as proxy:
        proxied_url = direct_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        base = Settings(data_dir=tmp_path / "data", heartbeat_seconds=0.5, checkpoint_every_steps=2)
        worker_settings = base.model_copy(update={"database_url": proxied_url, "lease_seconds": 3})
        api_settings = base.model_copy(update={"database_url": direct_url, "lease_seconds": 3})
        direct = make_session_factory(make_engine(direct_url))
        with session_scope(direct) as session:
            ModelRegistry(session).register("tiny-llama", str(tiny_model_dir), "local")
        store = LocalArtifactStore(base.artifacts_root)
        runner = JobRunner(worker_settings, make_session_factory(make_engine(proxied_url)), store)
        headers = make_tenant(direct, "local").headers
        with TestClient(create_app(api_settings, RecordingDispatcher()), headers=headers) as client:
            job_id = create_job(client, "tiny-llama", chat_lines(20), n_epochs=2, batch_size=1)
            thread = threading.Thread(target=runner.run, args=(job_id,))
            thread.start()
            url = f"/v1/fine_tuning/jobs/{job_id}/checkpoints"
            wait_for(lambda: bool(client.get(url).json()["data"]), 120, "a first checkpoint")

            proxy.cut()  # the worker loses the database; the API (direct) does not
            started = time.monotonic()
            thread.join(timeout=60)
            assert not thread.is_alive(), "the worker kept going without its lease"
            assert time.monotonic() - started < 30
            trainers = list((base.work_root / job_id).glob("attempt-1/output"))
            assert trainers == []  # the attempt cleaned up after killing its trainer

            reconciler = Reconciler(api_settings, direct, RecordingDispatcher())
            wait_for(lambda: reconciler.sweep().requeued == [job_id], 10, "the expired lease to be reaped")
            proxy.restore()
            runner.run(job_id)
            job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            assert job["status"] == "succeeded", job["error"]
            with session_scope(direct) as session:
                assert session.scalar(select(Job.attempt).where(Job.id == job_id)) == 2
            events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()[
                "data"
            ]
            assert any("resumed from step" in e["message"] for e in events)
            assert max(e["data"]["step"] for e in events if e["type"] == "metrics") == 40
