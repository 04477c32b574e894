"""The reconciler on Postgres and SQLite: expired leases are requeued (or fail after max attempts), stale
attempts are fenced off, waiting jobs are woken again, and overlapping sweeps act once."""

import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from models.db import session_scope
from models.orm import Job
from models.settings import Settings
from models.states import JobStatus, transition
from models.storage import LocalArtifactStore
from tests.conftest import RecordingDispatcher
from tests.test_runner import create_job, prompt_completion_lines
from worker.reconciler import Reconciler
from worker.runner import JobRunner


@pytest.fixture
def reconciler(settings: Settings, session_factory, dispatcher: RecordingDispatcher) -> Reconciler:  # type: ignore[no-untyped-def]
    return Reconciler(settings.model_copy(update={"max_attempts": 2}), session_factory, dispatcher)


def set_job(session_factory, job_id: str, **values: object) -> None:  # type: ignore[no-untyped-def]
    """Test setup only: put a job in a state a crash would leave it in."""
    with session_scope(session_factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def crashed_running_job(client: TestClient, session_factory, model: str, attempt: int) -> str:  # type: ignore[no-untyped-def]
    job_id = create_job(client, model, prompt_completion_lines(12))
    past = time.time() - 1
    set_job(
        session_factory,
        job_id,
        status="running",
        attempt=attempt,
        started_at=int(past) - 100,
        lease_expires_at=past,
    )
    return job_id


def status(client: TestClient, job_id: str) -> dict:  # type: ignore[type-arg]
    return client.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def test_expired_lease_is_requeued_and_runs_as_next_attempt(
    client: TestClient,
    session_factory,
    reconciler: Reconciler,
    dispatcher: RecordingDispatcher,
    registered_model: str,
    settings: Settings,  # type: ignore[no-untyped-def]
) -> None:
    job_id = crashed_running_job(client, session_factory, registered_model, attempt=1)
    dispatcher.submitted.clear()
    sweep = reconciler.sweep()
    assert sweep.requeued == [job_id] and dispatcher.submitted == [job_id]
    assert status(client, job_id)["status"] == "queued"
    warning = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"][0]
    assert warning["level"] == "warn" and "Attempt 1 stopped reporting" in warning["message"]
    assert reconciler.sweep().requeued == []

    # The stale attempt can no longer write; the new one runs and succeeds as attempt 2.
    with session_scope(session_factory) as session:
        assert not transition(session, job_id, from_=JobStatus.RUNNING, to=JobStatus.SUCCEEDED, attempt=1)
    JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root)).run(job_id)
    job = status(client, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert (settings.artifacts_root / "jobs" / job_id / "attempt-2" / "adapter").exists()


def test_attempts_are_bounded(
    client: TestClient,
    session_factory,
    reconciler: Reconciler,
    registered_model: str,  # type: ignore[no-untyped-def]
) -> None:
    job_id = crashed_running_job(client, session_factory, registered_model, attempt=2)
    assert reconciler.sweep().failed == [job_id]
    job = status(client, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "max_attempts_exceeded"
    assert "attempt 2 of 2" in job["error"]["message"]
    assert job["finished_at"] is not None


def test_live_leases_are_left_alone(
    client: TestClient,
    session_factory,
    reconciler: Reconciler,
    registered_model: str,  # type: ignore[no-untyped-def]
) -> None:
    job_id = create_job(client, registered_model, prompt_completion_lines(12))
    set_job(session_factory, job_id, status="running", attempt=1, lease_expires_at=time.time() + 60)
    assert reconciler.sweep().requeued == []
    assert status(client, job_id)["status"] == "running"


def test_waiting_jobs_are_woken_again_with_backoff(
    client: TestClient,
    session_factory,
    reconciler: Reconciler,
    dispatcher: RecordingDispatcher,
    registered_model: str,  # type: ignore[no-untyped-def]
) -> None:
    fresh = create_job(client, registered_model, prompt_completion_lines(12))
    lost = create_job(client, registered_model, prompt_completion_lines(12))
    hour_ago = time.time() - 3600
    set_job(session_factory, lost, created_at=int(hour_ago) - 10, dispatched_at=hour_ago)
    dispatcher.submitted.clear()
    assert reconciler.sweep().woken == [lost] and dispatcher.submitted == [lost]
    assert reconciler.sweep().woken == []  # just woken: not again until the interval passes
    assert fresh not in dispatcher.submitted


def test_overlapping_sweeps_requeue_once(
    client: TestClient,
    session_factory,
    reconciler: Reconciler,
    dispatcher: RecordingDispatcher,
    registered_model: str,  # type: ignore[no-untyped-def]
) -> None:
    job_id = crashed_running_job(client, session_factory, registered_model, attempt=1)
    barrier = threading.Barrier(4)
    sweeps = []

    def sweep() -> None:
        barrier.wait()
        sweeps.append(reconciler.sweep())

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(len(s.requeued) for s in sweeps) == 1
    messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]]
    assert sum("stopped reporting" in m for m in messages) == 1


def test_a_job_that_never_heartbeated_is_reaped(
    client: TestClient,
    session_factory,
    reconciler: Reconciler,
    registered_model: str,  # type: ignore[no-untyped-def]
) -> None:
    job_id = create_job(client, registered_model, prompt_completion_lines(12))
    set_job(session_factory, job_id, status="running", attempt=1, started_at=int(time.time()) - 3600)
    assert reconciler.sweep().requeued == [job_id]
