"""Object storage (a real SeaweedFS) failing under a running job: unreachable during a checkpoint upload
(the runner retries within its lease and the job trains on), and the runner killed -9 half way through
publishing a checkpoint (no manifest, nothing listed; the next attempt resumes from the checkpoint before).
No half-published checkpoint is ever listed."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from models.settings import Settings
from models.storage import open_store
from models.storage_s3 import MANIFEST, PUBLISHING, S3ArtifactStore
from tests.conftest import RecordingDispatcher, S3Server, s3_settings
from tests.faults.tcp_proxy import TcpProxy
from tests.jobs_helpers import chat_lines, wait_for
from tests.test_runner import create_job
from worker.reconciler import Reconciler
from worker.runner import JobRunner

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]

OUTAGE_SECONDS = 8.0
"""Longer than boto3's own retries ride out, far shorter than the lease."""


@pytest.fixture
def proxy(s3_env: S3Server) -> Iterator[TcpProxy]:
    with TcpProxy(urlsplit(s3_env.endpoint_url).port or 80) as running:
        yield running


@pytest.fixture
def settings(s3_env: S3Server, proxy: TcpProxy, tmp_path: Path, database_url: str) -> Settings:
    """Artifacts in SeaweedFS, reached through a proxy that can play an outage; a checkpoint every step."""
    return s3_settings(
        s3_env,
        tmp_path,
        s3_endpoint_url=f"http://127.0.0.1:{proxy.port}",
        database_url=database_url,
        heartbeat_seconds=0.5,
        checkpoint_every_steps=1,
        checkpoint_retention=100,
    )


def stored(store: S3ArtifactStore, under: str) -> set[str]:
    return {name for name, _ in store._list(under)}


def listed_checkpoints(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100}).json()["data"]


def test_store_unreachable_during_a_checkpoint_upload(
    client: TestClient,
    settings: Settings,
    session_factory: sessionmaker[Session],
    registered_model: str,
    proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    job_id = create_job(client, registered_model, chat_lines(10), n_epochs=1, batch_size=1)
    runner = JobRunner(settings, session_factory, open_store(settings))
    store = runner.store
    assert isinstance(store, S3ArtifactStore)
    cut = threading.Event()

    def cut_during_step_2(params: dict[str, Any], **_: Any) -> None:
        # The first file of step 2's checkpoint (its marker is written): the store goes away for a while.
        if "/checkpoints/step-2/" in params["Key"] and not params["Key"].endswith(PUBLISHING):
            if not cut.is_set():
                cut.set()
                proxy.cut()
                threading.Timer(OUTAGE_SECONDS, proxy.restore).start()

    store.client.meta.events.register("before-parameter-build.s3.PutObject", cut_during_step_2)
    with caplog.at_level(logging.WARNING, logger="ftjobs.worker"):
        runner.run(job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert cut.is_set() and job["status"] == "succeeded", job["error"]
    assert "artifact store unavailable" in caplog.text
    checkpoints = listed_checkpoints(client, job_id)
    assert sorted(c["step_number"] for c in checkpoints) == list(range(1, 11))
    names = stored(store, f"jobs/{job_id}/")
    for step in range(1, 11):  # all complete, from the attempt that rode the outage out, no marker left
        prefix = f"jobs/{job_id}/attempt-1/checkpoints/step-{step}"
        assert f"{prefix}/{MANIFEST}" in names and f"{prefix}/{PUBLISHING}" not in names


RUNNER = """
import sys, time
from pathlib import Path
from models.settings import Settings
from models.storage_s3 import PUBLISHING
from worker.runtime import make_runner

job_id, flag = sys.argv[1:]
runner = make_runner(Settings())

def stall(params, **_):
    # Half way through publishing step 2's checkpoint: its marker is up, its files are not.
    if "/checkpoints/step-2/" in params["Key"] and not params["Key"].endswith(PUBLISHING):
        Path(flag).touch()
        time.sleep(3600)

runner.store.client.meta.events.register("before-parameter-build.s3.PutObject", stall)
runner.run(job_id)
"""


def test_kill_9_during_a_checkpoint_publish(
    client: TestClient,
    settings: Settings,
    session_factory: sessionmaker[Session],
    registered_model: str,
    tmp_path: Path,
) -> None:
    job_id = create_job(client, registered_model, chat_lines(10), n_epochs=1, batch_size=1)
    env = {
        **os.environ,
        "FTJOBS_DATA_DIR": str(tmp_path / "worker"),
        "FTJOBS_DATABASE_URL": str(settings.database_url),
        "FTJOBS_STORAGE_URL": str(settings.storage_url),
        "FTJOBS_S3_ENDPOINT_URL": str(settings.s3_endpoint_url),
        "FTJOBS_HEARTBEAT_SECONDS": "0.5",
        "FTJOBS_LEASE_SECONDS": "3",
        "FTJOBS_CHECKPOINT_EVERY_STEPS": "1",
    }
    flag = tmp_path / "publishing"
    with open(tmp_path / "runner.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-c", RUNNER, job_id, str(flag)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for(flag.exists, 300, "the runner to publish step 2's checkpoint")
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()

    store = open_store(settings)
    assert isinstance(store, S3ArtifactStore)
    half = f"jobs/{job_id}/attempt-1/checkpoints/step-2"
    assert stored(store, f"{half}/") == {f"{half}/{PUBLISHING}"}  # no manifest: readers ignore it
    assert [c["step_number"] for c in listed_checkpoints(client, job_id)] == [1]
    assert not store.local_path(half).exists()

    # The dead runner's lease runs out; the reconciler queues the job again; another runner resumes it.
    short_lease = settings.model_copy(update={"lease_seconds": 3.0})
    reconciler = Reconciler(short_lease, session_factory, RecordingDispatcher())
    wait_for(lambda: job_id in reconciler.sweep().requeued, 60, "the lease to expire")
    JobRunner(settings, session_factory, store).run(job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert any("resumed from step 1" in event["message"] for event in events)
    assert sorted(c["step_number"] for c in listed_checkpoints(client, job_id)) == list(range(1, 11))
    keys = stored(store, f"jobs/{job_id}/")
    assert f"{half}/{MANIFEST}" not in keys
    for step in range(2, 11):  # attempt 2 wrote step 2 and on
        assert f"jobs/{job_id}/attempt-2/checkpoints/step-{step}/{MANIFEST}" in keys
    time.sleep(1.1)  # S3 times have one-second resolution
    assert half in store.sweep(older_than=0).prefixes  # what the kill left, the sweep removes
