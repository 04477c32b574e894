"""Jobs on several nodes through a real Slurm cluster (tests/slurm/cluster.sh: two slurmd "nodes" on this
machine). With FTJOBS_EXECUTOR=slurm the runner submits an allocation of compute.nodes nodes, `srun`
starts `ftjobs run-attempt` on each, and their launchers meet at node 0's c10d rendezvous (one CPU rank a
node: world size 2). A 2-node job reproduces a 1-device run's losses; a cancelled allocation (`scancel`)
makes the reconciler requeue the job, whose next attempt resumes from its newest checkpoint."""

import io
import re
import subprocess

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.conftest import RecordingDispatcher
from tests.faults.test_distributed_kill import events, train_losses
from tests.jobs_helpers import TERMINAL, chat_lines, wait_for
from worker.executors import SlurmExecutor
from worker.reconciler import Reconciler
from worker.runner import JobRunner

pytestmark = [pytest.mark.distributed, pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]

HYPERPARAMETERS = {"n_epochs": 4, "batch_size": 4, "max_seq_length": 512, "lora_dropout": 0.0}
N_TRAIN, TOTAL_STEPS = 16, 16  # long enough that a cancel after step 3 lands before the last step
LOSS_TOLERANCE = 1e-5
"""As tests/training/test_distributed.py: the ranks sum the same terms as one process, in another order."""


def runner(settings: Settings, session_factory: sessionmaker[Session], executor: bool = True) -> JobRunner:
    store = LocalArtifactStore(settings.artifacts_root)
    return JobRunner(settings, session_factory, store, SlurmExecutor(settings) if executor else None)


def create_job(client: TestClient, model: str, nodes: int) -> str:
    files = {"file": ("train.jsonl", io.BytesIO(chat_lines(N_TRAIN)))}
    train = client.post("/v1/files", files=files, data={"purpose": "fine-tune"}).json()["id"]
    body = {
        "model": model,
        "seed": 5,
        "training_file": train,
        "method": {"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
        "compute": {"nodes": nodes},
    }
    response = client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def finished(client: TestClient, job_id: str, reconciler: Reconciler) -> dict:
    """The job once it ends, sweeping as every process's reconciler does meanwhile."""
    job: dict = {}

    def ended() -> bool:
        nonlocal job
        reconciler.sweep()
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        return job["status"] in TERMINAL

    wait_for(ended, 600, f"job {job_id} to end")
    return job


def allocation(client: TestClient, job_id: str) -> str:
    """The Slurm job id of the job's latest attempt, from its event."""
    found = [
        m
        for e in events(client, job_id)
        if (m := re.search(r"submitted to Slurm as job (\d+)", e["message"]))
    ]
    assert found, events(client, job_id)
    return found[-1][1]


def squeue(slurm_id: str, fields: str) -> str:
    command = ["squeue", "--noheader", "--states=all", f"--jobs={slurm_id}", f"--format={fields}"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_a_two_node_job_reproduces_one_device_losses(
    client: TestClient, registered_model: str, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    reconciler = Reconciler(settings, session_factory, RecordingDispatcher())
    single = create_job(client, registered_model, nodes=1)
    runner(settings, session_factory, executor=False).run(single)  # the reference: one device, here
    assert client.get(f"/v1/fine_tuning/jobs/{single}").json()["status"] == "succeeded"

    job_id = create_job(client, registered_model, nodes=2)
    runner(settings, session_factory).run(job_id)  # submits, and returns
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "running"
    slurm_id = allocation(client, job_id)

    job = finished(client, job_id, reconciler)
    assert job["status"] == "succeeded", job["error"]
    assert job["compute"] == {"devices": 1, "nodes": 2, "device_class": None}
    assert job["fine_tuned_model"]
    assert train_losses(client, job_id) == pytest.approx(train_losses(client, single), abs=LOSS_TOLERANCE)
    # One allocation of two nodes did it (it ends just after the job: its runners exit once published).
    wait_for(lambda: squeue(slurm_id, "%T %D") == "COMPLETED 2", 60, "the allocation to complete")


def test_a_cancelled_allocation_is_requeued_and_its_next_attempt_resumes(
    client: TestClient, registered_model: str, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    reconciler = Reconciler(settings, session_factory, RecordingDispatcher())
    job_id = create_job(client, registered_model, nodes=2)
    runner(settings, session_factory).run(job_id)
    wait_for(lambda: train_losses(client, job_id).get(3) is not None, 300, "step 3, past a checkpoint")
    slurm_id = allocation(client, job_id)

    subprocess.run(["scancel", slurm_id], check=True)
    wait_for(lambda: job_id in reconciler.sweep().requeued, 60, "the reconciler to requeue the job")
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "queued", job["error"]
    killed = f"Attempt 1 was killed: its Slurm allocation {slurm_id} ended (CANCELLED)"
    assert any(e["level"] == "warn" and killed in e["message"] for e in events(client, job_id))

    runner(settings, session_factory).run(job_id)  # the next wake-up: attempt 2, a new allocation
    assert allocation(client, job_id) != slurm_id
    job = finished(client, job_id, reconciler)
    assert job["status"] == "succeeded", job["error"]
    messages = [e["message"] for e in events(client, job_id)]
    resumed = [int(found[1]) for m in messages if (found := re.search(r"resumed from step (\d+) of", m))]
    assert resumed and resumed[0] in range(2, TOTAL_STEPS, 2), messages
    assert list(train_losses(client, job_id)) == list(range(1, TOTAL_STEPS + 1))
