"""Two-rank jobs through the API (gloo on CPU), trained by the real runner: `full` supervised and DPO (both
sharded with FSDP2: DPO's reference log-probabilities come from the sharded model before the first step)
and text classification (`lora`, data-parallel, a new head trained in full) each report the losses and
tuned metrics of the same job on one device, and `qlora` (bitsandbytes' CPU 4-bit layers) runs to the end
on two. `lora` supervised on two ranks through the API is tests/faults/test_distributed_kill.py's. The
seven jobs train side by side on one worker offering enough devices, to keep the wall time of one job.
"""

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

from models.scheduling import Capacity
from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.jobs_helpers import chat_lines
from tests.test_objective_jobs import jsonl, upload
from tests.training.classifier_jobs import texts
from tests.training.test_preference import record as preference_record
from worker.runner import JobRunner

pytestmark = [pytest.mark.distributed, pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]

LOSS_TOLERANCE = 1e-5
"""As tests/training/test_distributed.py: the ranks sum the same terms as one process, in another order."""
TWO_RANK_CASES = ("full", "dpo", "classification")
LORA_NO_DROPOUT = {"training_type": "lora", "lora_dropout": 0.0}
"""With dropout each rank draws its own masks: equal losses need none (docs/distributed.md)."""
STEPS = {"full": 3, "dpo": 3, "classification": 4, "qlora": 3}
"""Each case's steps: its training rows over the batch of 4."""


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"devices": 2})


def bodies(client: TestClient, model: str) -> dict[str, dict[str, Any]]:
    """Each case's job body: one epoch of a few steps whose global batch two ranks split evenly."""
    chat, chat_valid = upload(client, chat_lines(12)), upload(client, chat_lines(4, "validation"))
    pairs = upload(client, jsonl([preference_record(i) for i in range(12)]))
    pairs_valid = upload(client, jsonl([preference_record(i) for i in range(50, 54)]))
    labelled, labelled_valid = (
        upload(client, jsonl(texts(16, seed=1))),
        upload(client, jsonl(texts(4, seed=2))),
    )
    one_epoch = {"n_epochs": 1, "batch_size": 4}
    cases = {
        "full": (chat, chat_valid, "supervised", {"training_type": "full", "learning_rate": 1e-3}),
        "dpo": (pairs, pairs_valid, "dpo", {"training_type": "full", "learning_rate": 1e-3, "beta": 0.5}),
        "classification": (labelled, labelled_valid, "supervised", LORA_NO_DROPOUT | {"learning_rate": 1e-2}),
        "qlora": (chat, chat_valid, "supervised", {"training_type": "qlora"}),
    }  # fmt: skip
    return {
        name: {
            "model": model,
            "training_file": train,
            "validation_file": valid,
            "seed": 3,
            "method": {"type": kind, kind: {"hyperparameters": {**one_epoch, **hyperparameters}}},
        }
        for name, (train, valid, kind, hyperparameters) in cases.items()
    }


def losses(client: TestClient, job_id: str) -> dict[int, float]:
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return {e["data"]["step"]: e["data"]["train_loss"] for e in events if "train_loss" in (e["data"] or {})}


@pytest.fixture
def jobs(client: TestClient, settings: Settings, session_factory, registered_model: str) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """Every case's job on one device and on two (qlora on two only), trained to the end."""
    created = {}
    for case, body in bodies(client, registered_model).items():
        for devices in (1, 2) if case in TWO_RANK_CASES else (2,):
            response = client.post("/v1/fine_tuning/jobs", json={**body, "compute": {"devices": devices}})
            assert response.status_code == 200, response.text
            created[f"{case}_{devices}"] = response.json()["id"]
    store = LocalArtifactStore(settings.artifacts_root)
    # A worker with room for all of them: each thread claims whichever job is next.
    runner = JobRunner(settings, session_factory, store, capacity=Capacity(2 * len(created), "cpu"))
    threads = [threading.Thread(target=runner.run, args=(job_id,)) for job_id in created.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return {name: client.get(f"/v1/fine_tuning/jobs/{job_id}").json() for name, job_id in created.items()}


def test_two_rank_jobs_train_what_one_rank_trains(client: TestClient, jobs: dict[str, dict]) -> None:
    for name, job in jobs.items():
        assert job["status"] == "succeeded", (name, job["error"])
        assert job["fine_tuned_model"] and job["compute"]["devices"] == int(name[-1])
    for case in TWO_RANK_CASES:
        one, two = jobs[f"{case}_1"], jobs[f"{case}_2"]
        reference = losses(client, one["id"])
        assert sorted(reference) == list(range(1, STEPS[case] + 1)), case
        assert losses(client, two["id"]) == pytest.approx(reference, abs=LOSS_TOLERANCE), case
        tuned = two["evaluation"]["tuned"]["metrics"]
        assert tuned == pytest.approx(
            one["evaluation"]["tuned"]["metrics"], rel=LOSS_TOLERANCE, abs=LOSS_TOLERANCE
        )
    assert sorted(losses(client, jobs["qlora_2"]["id"])) == list(range(1, STEPS["qlora"] + 1))
