"""The one transition function: legal moves only, and a compare-and-set that exactly one caller wins."""

import threading
import time

import pytest
from sqlalchemy import select

from models.db import session_scope
from models.orm import Job
from models.states import ALLOWED, TERMINAL, InvalidTransition, JobStatus, transition


def make_job(session_factory, status: JobStatus = JobStatus.QUEUED) -> str:  # type: ignore[no-untyped-def]
    with session_scope(session_factory) as session:
        job = Job(
            id=f"ftjob-{time.perf_counter_ns()}",
            organization_id="org-local",
            model="m",
            training_file="file-x",
            status=status.value,
            method={"type": "supervised"},
            seed=1,
            result_files=[],
            created_at=int(time.time()),
            attempt=0,
        )
        session.add(job)
        return job.id


def status_of(session_factory, job_id: str) -> str:  # type: ignore[no-untyped-def]
    with session_scope(session_factory) as session:
        return session.scalar(select(Job.status).where(Job.id == job_id))  # type: ignore[return-value]


def test_terminal_states_are_final() -> None:
    for state in TERMINAL:
        assert ALLOWED[state] == frozenset()
    with pytest.raises(InvalidTransition):
        transition(None, "x", from_=JobStatus.SUCCEEDED, to=JobStatus.RUNNING)  # type: ignore[arg-type]
    with pytest.raises(InvalidTransition):
        transition(None, "x", from_=JobStatus.VALIDATING_FILES, to=JobStatus.SUCCEEDED)  # type: ignore[arg-type]


def test_cas_applies_only_from_expected_state(session_factory) -> None:  # type: ignore[no-untyped-def]
    job_id = make_job(session_factory, JobStatus.VALIDATING_FILES)
    with session_scope(session_factory) as session:
        assert not transition(session, job_id, from_=JobStatus.QUEUED, to=JobStatus.RUNNING)
        assert transition(session, job_id, from_=JobStatus.VALIDATING_FILES, to=JobStatus.QUEUED)
    assert status_of(session_factory, job_id) == "queued"


def test_attempt_fences_stale_writers(session_factory) -> None:  # type: ignore[no-untyped-def]
    job_id = make_job(session_factory)
    with session_scope(session_factory) as session:
        assert transition(
            session, job_id, from_=JobStatus.QUEUED, to=JobStatus.RUNNING, attempt=0, values={"attempt": 1}
        )
    with session_scope(session_factory) as session:
        assert not transition(session, job_id, from_=JobStatus.RUNNING, to=JobStatus.SUCCEEDED, attempt=0)
        assert transition(session, job_id, from_=JobStatus.RUNNING, to=JobStatus.SUCCEEDED, attempt=1)


def test_concurrent_claims_have_one_winner(session_factory) -> None:  # type: ignore[no-untyped-def]
    """Eight runners race for one queued job (as with duplicate deliveries): exactly one claims it."""
    job_id = make_job(session_factory)
    barrier = threading.Barrier(8)
    wins: list[bool] = []

    def claim() -> None:
        barrier.wait()
        with session_scope(session_factory) as session:
            wins.append(transition(session, job_id, from_=JobStatus.QUEUED, to=JobStatus.RUNNING))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wins.count(True) == 1 and len(wins) == 8
    assert status_of(session_factory, job_id) == "running"
