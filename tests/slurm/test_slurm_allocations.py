"""The Slurm executor's bookkeeping on the real one-machine cluster, without training: an allocation that
waits to start keeps its job's lease (saying once why it waits: here, more nodes than the cluster has),
and a cancelled one makes the reconciler requeue the job. Training through Slurm is test_slurm_jobs.py."""

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.conftest import RecordingDispatcher
from tests.faults.test_distributed_kill import events
from tests.slurm.test_slurm_jobs import allocation, create_job
from tests.test_reconciler import crashed_running_job, set_job, status
from worker import slurm
from worker.executors import SlurmExecutor
from worker.reconciler import Reconciler
from worker.runner import JobRunner

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


def test_a_waiting_allocation_keeps_its_job_and_a_cancelled_one_requeues_it(
    client: TestClient, session_factory: sessionmaker[Session], registered_model: str, settings: Settings
) -> None:
    reconciler = Reconciler(settings, session_factory, RecordingDispatcher())
    held = slurm.submit("#!/bin/sh\ntrue\n", ["--hold", "--job-name=ftjobs-test-held", "--output=/dev/null"])
    job_id = crashed_running_job(client, session_factory, registered_model, attempt=1)  # its lease expired
    set_job(session_factory, job_id, lease_owner=slurm.owner(held))

    assert reconciler.sweep().requeued == []  # pending: nobody heartbeats for it yet, and that is fine
    assert status(client, job_id)["status"] == "running"

    slurm.cancel(held)
    assert reconciler.sweep().requeued == [job_id]
    assert status(client, job_id)["status"] == "queued"
    killed = f"Attempt 1 was killed: its Slurm allocation {held} ended (CANCELLED); the job is queued again."
    assert [e["message"] for e in events(client, job_id) if e["level"] == "warn"] == [killed]


def test_an_allocation_larger_than_the_partition_waits_saying_why_once(
    client: TestClient, session_factory: sessionmaker[Session], registered_model: str, settings: Settings
) -> None:
    """Slurm takes the allocation (EnforcePartLimits=NO, its default) and leaves it pending: the job is
    not lost and does not spin, and says once what it waits for, until the partition grows or someone
    cancels the allocation."""
    reconciler = Reconciler(settings, session_factory, RecordingDispatcher())
    job_id = create_job(client, registered_model, nodes=3)  # the cluster has 2
    store = LocalArtifactStore(settings.artifacts_root)
    JobRunner(settings, session_factory, store, SlurmExecutor(settings)).run(job_id)
    slurm_id = allocation(client, job_id)

    for _ in range(3):
        assert reconciler.sweep().requeued == []
    assert status(client, job_id)["status"] == "running"
    waits = [e["message"] for e in events(client, job_id) if "waits to start" in e["message"]]
    # Slurm's reason may still move from PartitionConfig to PartitionNodeLimit: one event per reason.
    assert waits and len(set(waits)) == len(waits), waits
    assert all(w.startswith(f"Slurm allocation {slurm_id} waits to start (Partition") for w in waits), waits

    slurm.cancel(slurm_id)
    assert reconciler.sweep().requeued == [job_id]


def test_an_allocation_slurm_refuses_sends_the_job_back_with_slurm_s_words(
    client: TestClient, session_factory: sessionmaker[Session], registered_model: str, settings: Settings
) -> None:
    settings = settings.model_copy(update={"slurm_partition": "no-such-partition", "max_attempts": 2})
    job_id = create_job(client, registered_model, nodes=2)
    store = LocalArtifactStore(settings.artifacts_root)
    runner = JobRunner(settings, session_factory, store, SlurmExecutor(settings))

    runner.run(job_id)
    assert status(client, job_id)["status"] == "queued"
    [warning] = [e["message"] for e in events(client, job_id) if e["level"] == "warn"]
    assert warning.startswith("Slurm did not take attempt 1: sbatch: error:") and "partition" in warning

    runner.run(job_id)  # the last attempt: the job fails, saying why
    job = status(client, job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "max_attempts_exceeded"
    assert "Slurm did not take attempt 2: sbatch: error:" in job["error"]["message"]


def test_a_local_worker_fails_a_job_on_several_nodes_naming_the_field(
    client: TestClient, session_factory: sessionmaker[Session], registered_model: str, settings: Settings
) -> None:
    """The API took it (FTJOBS_EXECUTOR=slurm there) but this worker was left on the local executor."""
    job_id = create_job(client, registered_model, nodes=2)
    JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root)).run(job_id)
    job = status(client, job_id)
    assert job["status"] == "failed"
    assert (job["error"]["code"], job["error"]["param"]) == ("invalid_compute", "compute.nodes")
