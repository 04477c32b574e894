"""Killing parts of a 2-rank job (gloo on CPU): a rank killed by a signal makes the attempt count as killed
(requeued) and the next attempt resumes from the newest checkpoint, with the same losses as a 1-device run
of the job; the launcher killed takes every rank with it."""

import io
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from fastapi.testclient import TestClient

from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.jobs_helpers import chat_lines, wait_for
from tests.tiny_model import build_tiny_llama
from tests.training.test_sft_run import make_spec, write_jsonl
from worker.child import TrainingProcess
from worker.runner import JobRunner

pytestmark = pytest.mark.distributed

HYPERPARAMETERS = {"n_epochs": 4, "batch_size": 4, "max_seq_length": 512, "lora_dropout": 0.0}
N_TRAIN, TOTAL_STEPS = 16, 16  # long enough that a kill after step 3 lands before the last step
LOSS_TOLERANCE = 1e-5
"""As tests/training/test_distributed.py: the ranks sum the same terms as one process, in another order."""


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"devices": 2, "checkpoint_every_steps": 2})


def create_job(client: TestClient, model: str, train: str, devices: int) -> str:
    body = {
        "model": model,
        "seed": 5,
        "training_file": train,
        "method": {"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
        "compute": {"devices": devices},
    }
    response = client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def events(client: TestClient, job_id: str) -> list[dict]:
    url = f"/v1/fine_tuning/jobs/{job_id}/events"
    return list(reversed(client.get(url, params={"limit": 1000}).json()["data"]))


def train_losses(client: TestClient, job_id: str) -> dict[int, float]:
    """Each step's training loss, the latest attempt's where a step ran twice."""
    return {
        e["data"]["step"]: e["data"]["train_loss"]
        for e in events(client, job_id)
        if e["type"] == "metrics" and "train_loss" in e["data"]
    }


def ranks(launcher: psutil.Process) -> list[psutil.Process]:
    return [child for child in launcher.children() if "worker.training" in " ".join(child.cmdline())]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # the runner's rules, once
def test_a_killed_rank_requeues_the_attempt_which_resumes_with_one_device_losses(
    client: TestClient, registered_model: str, settings: Settings, session_factory
) -> None:  # type: ignore[no-untyped-def]
    runner = JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root))
    files = {"file": ("train.jsonl", io.BytesIO(chat_lines(N_TRAIN)))}
    train = client.post("/v1/files", files=files, data={"purpose": "fine-tune"}).json()["id"]
    single = create_job(client, registered_model, train, devices=1)
    runner.run(single)
    assert client.get(f"/v1/fine_tuning/jobs/{single}").json()["status"] == "succeeded"

    job_id = create_job(client, registered_model, train, devices=2)
    thread = threading.Thread(target=runner.run, args=(job_id,))
    thread.start()
    wait_for(lambda: train_losses(client, job_id).get(3) is not None, 180, "step 3, past a checkpoint")
    [launcher] = [
        process
        for process in psutil.process_iter(["cmdline"])
        if {"worker.training.launch", f"{job_id}-attempt-1"} <= set(process.info["cmdline"] or [])
    ]
    ranks(launcher)[1].send_signal(signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive()
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "queued", job["error"]
    assert any(e["level"] == "warn" and "killed (signal 9)" in e["message"] for e in events(client, job_id))

    runner.run(job_id)  # the next wake-up
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["compute"]["devices"] == 2
    # The newest checkpoint when the rank died: at least step 2 (step 3 had run), and on a fast machine the
    # trainer may have checkpointed again before the kill landed.
    messages = [e["message"] for e in events(client, job_id)]
    resumed = [int(found[1]) for m in messages if (found := re.search(r"resumed from step (\d+) of", m))]
    assert resumed and resumed[0] in range(2, TOTAL_STEPS, 2), messages
    assert list(train_losses(client, job_id)) == list(range(1, TOTAL_STEPS + 1))
    assert train_losses(client, job_id) == pytest.approx(train_losses(client, single), abs=LOSS_TOLERANCE)


def test_no_rank_outlives_its_launcher(tmp_path: Path) -> None:
    base = build_tiny_llama(tmp_path / "base")
    train = write_jsonl(tmp_path / "train.jsonl", 40)
    spec = make_spec(tmp_path, "job", base, train, train)
    spec = spec.model_copy(
        update={
            "devices": 2,
            "hyperparameters": spec.hyperparameters.model_copy(update={"n_epochs": 50, "batch_size": 2}),
        }
    )
    child = TrainingProcess(spec, tmp_path / "job")
    deadline = time.monotonic() + 120
    while not any(m.type == "metrics" for m in child.messages(timeout=0.5)):
        assert time.monotonic() < deadline and not child.finished, child.log_tail()
    launcher = psutil.Process(child.process.pid)
    trainers = ranks(launcher)
    assert len(trainers) == 2

    launcher.send_signal(signal.SIGKILL)
    gone, alive = psutil.wait_procs(trainers, timeout=10)
    assert alive == [], "a rank outlived its killed launcher"
    child.process.wait(timeout=10)
    assert child.process.returncode == -signal.SIGKILL
