"""The job runner on a real database and tiny real models: validation failures, a full run, duplicate
deliveries, and cancelling a running job."""

import io
import os
import signal
import subprocess
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.jobs_helpers import chat_lines, prompt_completion_lines, wait_for
from worker.runner import JobRunner

FAST = {"n_epochs": 1, "batch_size": 4, "max_seq_length": 512}


@pytest.fixture
def runner(settings: Settings, session_factory) -> JobRunner:  # type: ignore[no-untyped-def]
    return JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root))


def upload(client: TestClient, content: bytes, headers: dict[str, str] | None = None) -> str:
    """A file's id; `headers`: another organisation's key than the client's."""
    files = {"file": ("data.jsonl", io.BytesIO(content))}
    return client.post("/v1/files", files=files, data={"purpose": "fine-tune"}, headers=headers).json()["id"]


def run_until_training(client: TestClient, runner: JobRunner, job_id: str) -> threading.Thread:
    """The runner on a thread of its own, handed back once the job has reported its first metrics."""
    thread = threading.Thread(target=runner.run, args=(job_id,))
    thread.start()
    events_url = f"/v1/fine_tuning/jobs/{job_id}/events"
    wait_for(
        lambda: any(e["type"] == "metrics" for e in client.get(events_url).json()["data"]), 120, "training"
    )
    return thread


def create_job(
    client: TestClient,
    model: str,
    train: bytes,
    valid: bytes | None = None,
    seed: int | None = None,
    **hyper: object,
) -> str:
    body = {
        "model": model,
        "seed": seed,
        "training_file": upload(client, train),
        "method": {"type": "supervised", "supervised": {"hyperparameters": {**FAST, **hyper}}},
    }
    if valid is not None:
        body["validation_file"] = upload(client, valid)
    response = client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]


BAD_FILES = [
    pytest.param(b"not json\n", None, "invalid_file_format", "training_file", "Line 1", id="invalid-json"),
    pytest.param(b"[1, 2]\n", None, "invalid_file_format", "training_file", "dictionary", id="not-object"),
    pytest.param(b"\xff\xfe\n", None, "invalid_file_format", "training_file", "UTF-8", id="not-utf8"),
    pytest.param(b"", None, "invalid_file_format", "training_file", "", id="empty"),
    pytest.param(chat_lines(3), None, "invalid_n_examples", "training_file", "3 example(s)", id="too-few"),
    pytest.param(
        chat_lines(11) + b'{"messages": [{"role": "robot", "content": "hi"}]}\n',
        None, "invalid_example", "training_file", "line 12", id="bad-role",
    ),
    pytest.param(
        b'{"review": "great"}\n' * 10, None, "invalid_example", "training_file", "Line 1", id="unknown",
    ),
    pytest.param(
        chat_lines(10), b'{"messages": [{"role": "user", "content": "hi"}]}\n',
        "invalid_example", "validation_file", "line 1", id="valid-no-assistant",
    ),
    pytest.param(
        chat_lines(10), prompt_completion_lines(2),
        "invalid_file_format", "validation_file", "format", id="valid-other-format",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("train", "valid", "code", "param", "fragment"), BAD_FILES)
def test_bad_files_fail_the_job_with_a_precise_error(
    client: TestClient,
    runner: JobRunner,
    registered_model: str,
    train,
    valid,
    code,
    param,
    fragment,  # type: ignore[no-untyped-def]
) -> None:
    job_id = create_job(client, registered_model, train, valid)
    runner.run(job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == code and job["error"]["param"] == param
    assert fragment.lower() in job["error"]["message"].lower()
    assert job["finished_at"] is not None and job["fine_tuned_model"] is None
    newest = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"][0]
    assert newest["level"] == "error" and newest["message"] == job["error"]["message"]


def test_a_job_runs_to_success(
    client: TestClient, runner: JobRunner, registered_model: str, settings: Settings
) -> None:
    job_id = create_job(client, registered_model, chat_lines(12), chat_lines(4, "validation"), n_epochs=2)
    runner.run(job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    short_id = job_id.removeprefix("ftjob-")[:8]
    assert job["fine_tuned_model"] == f"ft:{registered_model}:local::{short_id}"
    assert job["trained_tokens"] > 0 and job["finished_at"] >= job["created_at"]
    resolved = job["method"]["supervised"]["hyperparameters"]
    assert resolved["n_epochs"] == 2 and resolved["batch_size"] == 4 and resolved["learning_rate"] == 2e-4
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0}

    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    # Too short for a range test: the default rate, and an event saying why.
    [kept] = [e for e in events if e["message"].startswith("Learning rate multiplier kept at 1 ")]
    assert (
        "5% of the job's 24 training examples makes 0 test steps of 4, fewer than the 16" in kept["message"]
    )
    assert kept["data"]["steps"] == 0 and not kept["data"]["found"]
    messages = [e["message"] for e in reversed(events)]
    started = messages.index("Fine-tuning job started")
    assert messages[started - 1] == "Files validated, moving job to queued state"
    metrics = [e for e in reversed(events) if e["type"] == "metrics"]
    assert [e["data"]["step"] for e in metrics] == [0, 1, 2, 3, 4, 5, 6]
    assert metrics[0]["message"].startswith(
        f"Baseline evaluation of {registered_model} before training: loss="
    )
    assert metrics[1]["message"].startswith("Step 1/6: training loss=")
    assert messages[-2:] == [
        f"New fine-tuned model created: {job['fine_tuned_model']}",
        "The job has successfully completed",
    ]
    last_metrics = next(e for e in events if e["type"] == "metrics")
    assert last_metrics["data"]["step"] == 6 and last_metrics["data"]["total_steps"] == 6
    assert {"train_loss", "train_mean_token_accuracy", "full_valid_loss"} <= set(last_metrics["data"])

    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [6, 3]
    assert checkpoints[0]["fine_tuned_model_checkpoint"] == f"{job['fine_tuned_model']}:ckpt-step-6"
    assert checkpoints[0]["metrics"]["full_valid_loss"] > 0

    # Baseline vs tuned on the validation file, and the best checkpoint by the default metric.
    evaluation = job["evaluation"]
    assert evaluation["metric"] == "full_valid_loss"
    baseline, tuned = evaluation["baseline"], evaluation["tuned"]
    assert (baseline["step"], tuned["step"]) == (0, 6)
    assert tuned["metrics"] == {
        k: v for k, v in checkpoints[0]["metrics"].items() if k.startswith("full_valid")
    }
    assert evaluation["gain"] == {k: tuned["metrics"][k] - baseline["metrics"][k] for k in tuned["metrics"]}
    assert len(tuned["details"]["generations"]) == 4
    best = min(checkpoints, key=lambda c: c["metrics"]["full_valid_loss"])
    assert evaluation["best_checkpoint"] == {
        "id": best["id"],
        "step": best["step_number"],
        "metric": "full_valid_loss",
        "value": best["metrics"]["full_valid_loss"],
        "fine_tuned_model_checkpoint": best["fine_tuned_model_checkpoint"],
    }

    results = client.get(f"/v1/files/{job['result_files'][0]}").json()
    assert results["purpose"] == "fine-tune-results" and results["filename"] == "step_metrics.csv"
    csv = client.get(f"/v1/files/{results['id']}/content").text.splitlines()
    assert csv[0].startswith("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy,full_valid")
    assert [row.split(",")[0] for row in csv[1:]] == ["0", "1", "2", "3", "4", "5", "6"]
    adapter = settings.artifacts_root / "jobs" / job_id / "attempt-1" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert (settings.artifacts_root / "jobs" / job_id / "attempt-1" / "train.log").exists()
    assert not (settings.work_root / job_id).joinpath("attempt-1").exists()


def test_duplicate_deliveries_run_one_attempt(
    client: TestClient, runner: JobRunner, registered_model: str
) -> None:
    job_id = create_job(client, registered_model, prompt_completion_lines(12))
    threads = [threading.Thread(target=runner.run, args=(job_id,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runner.run(job_id)  # a late redelivery after the end is a no-op too
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    messages = [
        e["message"]
        for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 200}).json()["data"]
    ]
    assert messages.count("Fine-tuning job started") == 1
    assert messages.count("Files validated, moving job to queued state") == 1


def test_cancelling_a_running_job_stops_training_and_publishes_nothing(
    client: TestClient, runner: JobRunner, registered_model: str, settings: Settings
) -> None:
    job_id = create_job(client, registered_model, chat_lines(40), n_epochs=50, batch_size=1)
    thread = run_until_training(client, runner, job_id)
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled"
    thread.join(timeout=60)
    assert not thread.is_alive(), "the runner did not stop its trainer"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None and job["result_files"] == []
    assert not (settings.artifacts_root / "jobs" / job_id / "attempt-1" / "adapter").exists()
    steps = [
        e["data"]["step"]
        for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        if e["type"] == "metrics"
    ]
    assert max(steps) < 2000


def test_a_killed_trainer_is_retried_as_the_next_attempt(
    client: TestClient, runner: JobRunner, registered_model: str, settings: Settings
) -> None:
    """kill -9 of the training child (as the OOM killer would): attempt 1 is requeued, attempt 2 succeeds."""
    job_id = create_job(client, registered_model, chat_lines(30), n_epochs=4, batch_size=1)
    thread = run_until_training(client, runner, job_id)
    events_url = f"/v1/fine_tuning/jobs/{job_id}/events"
    trainer = subprocess.run(
        ["pgrep", "-f", f"worker.training --spec .*{job_id}"], capture_output=True, text=True
    )
    os.kill(int(trainer.stdout.split()[0]), signal.SIGKILL)
    thread.join(timeout=60)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "queued"
    warning = client.get(events_url).json()["data"][0]
    assert warning["level"] == "warn" and "killed (signal 9)" in warning["message"]

    runner.run(job_id)  # the next wake-up
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    assert (settings.artifacts_root / "jobs" / job_id / "attempt-2" / "adapter").exists()
    assert not (settings.artifacts_root / "jobs" / job_id / "attempt-1" / "adapter").exists()


def adapter_tensors(settings: Settings, job_id: str, attempt: int) -> dict[str, torch.Tensor]:
    return load_file(
        settings.artifacts_root
        / "jobs"
        / job_id
        / f"attempt-{attempt}"
        / "adapter"
        / "adapter_model.safetensors"
    )


def test_pause_then_resume_matches_an_uninterrupted_run(
    client: TestClient, runner: JobRunner, registered_model: str, settings: Settings
) -> None:
    """Pause mid-run (the trainer checkpoints and frees the worker), resume: the new attempt continues from
    that checkpoint and ends with the same adapter as a run that was never paused."""
    # Enough steps that the pause lands mid-run however fast the machine; quick heartbeats to notice it.
    train, seed, total = chat_lines(30), 11, 120
    runner = JobRunner(
        runner.settings.model_copy(update={"heartbeat_seconds": 0.1}), runner.session_factory, runner.store
    )
    straight = create_job(client, registered_model, train, n_epochs=4, batch_size=1, seed=seed)
    runner.run(straight)
    paused = create_job(client, registered_model, train, n_epochs=4, batch_size=1, seed=seed)
    thread = run_until_training(client, runner, paused)
    events_url = f"/v1/fine_tuning/jobs/{paused}/events"
    assert client.post(f"/v1/fine_tuning/jobs/{paused}/pause").json()["status"] == "paused"
    thread.join(timeout=60)
    assert not thread.is_alive() and client.get(f"/v1/fine_tuning/jobs/{paused}").json()["status"] == "paused"
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{paused}/checkpoints").json()["data"]
    pause_step = checkpoints[0]["step_number"]
    assert 1 <= pause_step < total
    paused_events = client.get(events_url).json()["data"]
    assert paused_events[0]["message"].startswith(f"Paused at step {pause_step}:")
    assert paused_events[0]["data"] == {"step": pause_step}

    assert client.post(f"/v1/fine_tuning/jobs/{paused}/resume").json()["status"] == "queued"
    runner.run(paused)
    job = client.get(f"/v1/fine_tuning/jobs/{paused}").json()
    assert job["status"] == "succeeded", job["error"]
    events = client.get(events_url, params={"limit": 1000}).json()["data"]
    assert any(f"resumed from step {pause_step}" in e["message"] for e in events)
    steps = [e["data"]["step"] for e in reversed(events) if e["type"] == "metrics"]
    assert steps[-1] == total and sorted(set(steps)) == list(range(1, total + 1))
    final, reference = adapter_tensors(settings, paused, 2), adapter_tensors(settings, straight, 1)
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=1e-5)
    csv = client.get(f"/v1/files/{job['result_files'][0]}/content").text.splitlines()
    assert [row.split(",")[0] for row in csv[1:]] == [str(step) for step in range(1, total + 1)]


def test_an_auto_learning_rate_is_found_once_and_kept_across_a_pause(
    client: TestClient, runner: JobRunner, registered_model: str
) -> None:
    """learning_rate_multiplier "auto" on a job long enough for a range test (16 examples, 20 epochs of
    batches of 1: 320 steps, a budget of 16 test steps): the first attempt runs it, says what it found in
    an event and stores it; the job echoes it; the resumed attempt trains with it and does not test again."""
    runner = JobRunner(
        runner.settings.model_copy(update={"heartbeat_seconds": 0.1}), runner.session_factory, runner.store
    )
    job_id = create_job(client, registered_model, chat_lines(16), n_epochs=20, batch_size=1)
    thread = run_until_training(client, runner, job_id)
    events_url = f"/v1/fine_tuning/jobs/{job_id}/events"
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
    thread.join(timeout=60)
    assert not thread.is_alive()
    echoed = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["method"]["supervised"]["hyperparameters"]
    multiplier = echoed["learning_rate_multiplier"]
    assert isinstance(multiplier, float) and echoed["learning_rate"] == pytest.approx(2e-4 * multiplier)

    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
    runner.run(job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["hyperparameters"]["learning_rate_multiplier"] == multiplier
    events = client.get(events_url, params={"limit": 1000}).json()["data"]
    assert any("resumed from step" in e["message"] for e in events)
    # One test, in the first attempt. Whether this random model's noisy batch-of-1 curve falls enough to
    # pick from depends on the job's seed: tests/training/test_lr_range.py checks a pick.
    [tested] = [
        e for e in events if e["message"].startswith(("Learning rate found", "Learning rate multiplier"))
    ]
    assert tested["data"]["learning_rate_multiplier"] == multiplier
    assert 0 < tested["data"]["steps"] <= tested["data"]["budget_steps"] == 16
    assert (
        f"{multiplier:g}" in tested["message"]
        and "16 examples (5.0% of the job's training)" in tested["message"]
    )
