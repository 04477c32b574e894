"""Faults while a checkpoint is being written: a kill halfway through, and a full disk. No incomplete
checkpoint is ever recorded or resumed from."""

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.conftest import _unavailable
from tests.jobs_helpers import chat_lines, wait_for
from tests.test_runner import create_job
from worker.runner import JobRunner

pytestmark = pytest.mark.e2e


def trainer_pid(job_id: str) -> int | None:
    found = subprocess.run(
        ["pgrep", "-f", f"worker.training --spec .*{job_id}"], capture_output=True, text=True
    )
    return int(found.stdout.split()[0]) if found.stdout.strip() else None


def test_kill_during_a_checkpoint_write(
    client: TestClient,
    settings: Settings,
    session_factory,
    registered_model: str,  # type: ignore[no-untyped-def]
) -> None:
    settings = settings.model_copy(update={"checkpoint_every_steps": 1})
    runner = JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root))
    job_id = create_job(client, registered_model, chat_lines(20), n_epochs=2, batch_size=1)
    thread = threading.Thread(target=runner.run, args=(job_id,))
    thread.start()
    checkpoints = settings.work_root / job_id / "attempt-1" / "output" / "checkpoints"
    wait_for(
        lambda: checkpoints.exists() and len(list(checkpoints.glob("step-*"))) >= 2, 120, "two checkpoints"
    )
    # Kill the trainer the moment a checkpoint is half-written.
    deadline = time.monotonic() + 60
    while not list(checkpoints.glob(".step-*.partial")):
        assert time.monotonic() < deadline, "never caught a checkpoint being written"
    pid = trainer_pid(job_id)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "queued"

    recorded = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    stored = settings.artifacts_root / "jobs" / job_id / "attempt-1" / "checkpoints"
    for checkpoint in recorded:
        assert (stored / f"step-{checkpoint['step_number']}" / "COMPLETE").exists()
    assert not list(stored.glob("*partial*"))

    runner.run(job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert any(f"resumed from step {recorded[0]['step_number']}" in e["message"] for e in events)
    assert max(e["data"]["step"] for e in events if e["type"] == "metrics") == 40


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB file system for the trainer's scratch space."""
    mountpoint = tmp_path / "tiny-disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)], capture_output=True
    )
    if mounted.returncode != 0:
        _unavailable("mounting a small tmpfs", RuntimeError(mounted.stderr.decode()))
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_disk_full_while_checkpointing_fails_clearly(
    client: TestClient,
    settings: Settings,
    session_factory,
    registered_model: str,
    tiny_disk: Path,  # type: ignore[no-untyped-def]
) -> None:
    settings = settings.model_copy(update={"checkpoint_every_steps": 1, "work_dir": tiny_disk})
    runner = JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root))
    # Leave room for a few checkpoints of the tiny model, not for the whole run.
    (tiny_disk / "filler").write_bytes(b"\0" * (4 * 1024 * 1024 - 400 * 1024))
    job_id = create_job(client, registered_model, chat_lines(20), n_epochs=2, batch_size=1)
    runner.run(job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "training_failed" and "No space left on device" in job["error"]["message"]
    stored = settings.artifacts_root / "jobs" / job_id / "attempt-1" / "checkpoints"
    recorded = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    for checkpoint in recorded:
        assert (stored / f"step-{checkpoint['step_number']}" / "COMPLETE").exists()
    assert job["fine_tuned_model"] is None and job["result_files"] == []
