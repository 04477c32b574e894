"""Publishing the best checkpoint (issue 20, item 2): in a run whose learning rate is too high an earlier
checkpoint is better than the last, and that checkpoint's weights are what the job publishes as its
fine-tuned model; `last` keeps OpenAI's meaning."""

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from models.settings import Settings
from tests.jobs_helpers import chat_lines
from tests.test_runner import create_job, runner, upload  # noqa: F401 (runner: a fixture)
from worker.runner import JobRunner

# Far too high for LoRA at a constant rate: the validation loss wanders instead of falling steadily. Which
# step is best depends on the draw, so the job's seed is fixed: with seed 0 the loss is lowest at step 4
# (6.095) and higher at step 6 (6.129), every run on this CPU (float32, one thread).
WANDERING = {
    "n_epochs": 1,
    "batch_size": 2,
    "learning_rate": 0.3,
    "lr_scheduler": "constant",
    "warmup_ratio": 0.0,
    "eval_steps": 1,
    "generation_eval_samples": 0,
}


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # the database is not what varies
def test_the_best_checkpoint_is_published(
    client: TestClient,
    runner: JobRunner,  # noqa: F811
    registered_model: str,
    settings: Settings,
) -> None:
    job_id = create_job(
        client, registered_model, chat_lines(12), chat_lines(4, "validation"), seed=0, **WANDERING
    )
    runner.run(job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    best = job["evaluation"]["best_checkpoint"]
    assert job["publish"] == "best" and job["published_step"] == best["step"] < 6, job["evaluation"]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    assert any(f"best checkpoint, step {best['step']} of 6" in event["message"] for event in events)

    attempt = settings.artifacts_root / "jobs" / job_id / "attempt-1"
    published = load_file(attempt / "adapter" / "adapter_model.safetensors")
    checkpoint = load_file(attempt / "checkpoints" / f"step-{best['step']}" / "adapter_model.safetensors")
    last = load_file(attempt / "checkpoints" / "step-6" / "adapter_model.safetensors")
    assert published.keys() == checkpoint.keys()
    assert all(torch.equal(published[name], checkpoint[name]) for name in published)
    assert not all(torch.equal(published[name], last[name]) for name in published)
    model = client.get(f"/v1/models/{job['fine_tuned_model']}").json()
    assert model["lineage"]["step"] == best["step"]
    assert model["lineage"]["metrics"]["full_valid_loss"] == best["value"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_publish_defaults_to_best_only_with_a_validation_file(
    client: TestClient, registered_model: str
) -> None:
    train, valid = upload(client, chat_lines(12)), upload(client, chat_lines(4, "validation"))
    jobs = "/v1/fine_tuning/jobs"
    without = client.post(jobs, json={"model": registered_model, "training_file": train}).json()
    with_ = client.post(
        jobs, json={"model": registered_model, "training_file": train, "validation_file": valid}
    )
    assert (without["publish"], with_.json()["publish"]) == ("last", "best")
    last = {"model": registered_model, "training_file": train, "validation_file": valid, "publish": "last"}
    assert client.post(jobs, json=last).json()["publish"] == "last"
    refused = client.post(jobs, json={"model": registered_model, "training_file": train, "publish": "best"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "publish"
