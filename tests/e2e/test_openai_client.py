"""The whole loop through the official openai client, against real servers: embedded (`ftjobs up`,
SQLite) and distributed (`ftjobs api` + `ftjobs worker` on Postgres and Redis)."""

import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import openai
import pytest
import torch
from openai.types.fine_tuning import FineTuningJob
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.queue import RUN_JOB, make_celery
from models.settings import Settings
from tests.conftest import fresh_postgres_database
from tests.e2e.servers import cli, create_key, distributed_env, free_port, process
from tests.jobs_helpers import succeeded, wait_for, write_chat

pytestmark = pytest.mark.e2e


def run_job(client: openai.OpenAI, tmp_path: Path, model: str) -> FineTuningJob:
    with open(write_chat(tmp_path / "train.jsonl", 12), "rb") as train:
        training_file = client.files.create(file=train, purpose="fine-tune")
    with open(write_chat(tmp_path / "valid.jsonl", 4, "validation"), "rb") as valid:
        validation_file = client.files.create(file=valid, purpose="fine-tune")
    assert client.files.retrieve(training_file.id).status == "processed"
    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=training_file.id,
        validation_file=validation_file.id,
        suffix="e2e",
        seed=3,
        metadata={"test": "e2e"},
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 2, "batch_size": 4, "lora_r": 4, "max_seq_length": 512}
            },  # type: ignore[typeddict-unknown-key]
        },
    )
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 2
    return succeeded(client, job)


def check_outputs(client: openai.OpenAI, job: FineTuningJob, model: str) -> None:
    assert job.fine_tuned_model and job.fine_tuned_model.startswith(f"ft:{model}:local:e2e:")
    assert job.trained_tokens and job.trained_tokens > 0 and job.finished_at
    assert job.method.supervised.hyperparameters.batch_size == 4  # type: ignore[union-attr]
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert events[0].message == "The job has successfully completed"
    assert [e.data["step"] for e in events if e.type == "metrics"][0] == 6  # type: ignore[index]
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [6, 3]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-6"
    assert checkpoints[0].metrics.full_valid_loss is not None
    csv = client.files.content(job.result_files[0]).text.splitlines()
    assert csv[0].startswith("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy,")
    assert len(csv) == 8  # the header, the baseline (step 0) and 6 steps
    # The evaluation extension rides on the job object as an extra field.
    evaluation = job.model_extra["evaluation"]  # type: ignore[index]
    assert evaluation["best_checkpoint"]["fine_tuned_model_checkpoint"] in {
        c.fine_tuned_model_checkpoint for c in checkpoints
    }
    assert evaluation["baseline"]["step"] == 0 and evaluation["tuned"]["step"] == 6
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"test": "e2e"})] == [job.id]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.retrieve("ftjob-missing")
    assert missing.value.request_id


def check_adapter(adapter_dir: Path, base_dir: Path) -> None:
    """The stored adapter reloads onto the base model and changes what it computes."""
    assert (adapter_dir / "adapter_model.safetensors").exists()
    assert not list(adapter_dir.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True)
    with torch.no_grad():
        before = base(**inputs).logits
        tuned = PeftModel.from_pretrained(base, adapter_dir)
        after = tuned(**inputs).logits
    assert not torch.allclose(before, after)


@pytest.fixture
def embedded(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[openai.OpenAI, Path]]:
    data_dir = tmp_path / "data"
    env = {"FTJOBS_DATA_DIR": str(data_dir), "FTJOBS_HEARTBEAT_SECONDS": "0.5"}
    cli("models", "add", "tiny-llama", str(tiny_model_dir), env=env)
    assert "tiny-llama" in cli("models", "list", env=env).stdout
    port = free_port()
    with process(["up", "--port", str(port)], env, tmp_path / "up.log", f"http://127.0.0.1:{port}/healthz"):
        yield (
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=create_key(env), max_retries=0),
            data_dir,
        )


def test_embedded_server_with_openai_client(embedded, tmp_path: Path, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client, data_dir = embedded
    job = run_job(client, tmp_path, "tiny-llama")
    check_outputs(client, job, "tiny-llama")
    check_adapter(data_dir / "artifacts" / "jobs" / job.id / "attempt-1" / "adapter", tiny_model_dir)

    # The first start showed an admin key, once; the CLI drives the same API with the organisation's key.
    assert (tmp_path / "up.log").read_text().count("Admin key") == 1
    env = {"FTJOBS_BASE_URL": str(client.base_url).rstrip("/"), "OPENAI_API_KEY": client.api_key}
    followed = cli("jobs", "follow", job.id, env=env)
    assert f"{job.id}: succeeded {job.fine_tuned_model}" in followed.stdout
    assert (
        json.loads(cli("jobs", "get", job.id, "--json", env=env).stdout)["trained_tokens"]
        == job.trained_tokens
    )
    assert "The job has successfully completed" in cli("jobs", "events", job.id, env=env).stdout
    assert job.id in cli("jobs", "list", env=env).stdout
    assert job.training_file in cli("files", "list", env=env).stdout
    assert (
        json.loads(cli("files", "get", job.result_files[0], "--json", env=env).stdout)["purpose"]
        == "fine-tune-results"
    )
    assert cli("files", "content", job.result_files[0], env=env).stdout.startswith("step,train_loss,")
    assert f"{job.fine_tuned_model}:ckpt-step-6" in cli("jobs", "checkpoints", job.id, env=env).stdout
    uploaded = json.loads(cli("files", "upload", str(tmp_path / "train.jsonl"), "--json", env=env).stdout)
    created = json.loads(
        cli(
            "jobs",
            "create",
            "--model",
            "tiny-llama",
            "--training-file",
            uploaded["id"],
            "--method",
            "supervised",
            "-p",
            "n_epochs=1",
            "-p",
            "training_type=dora",
            "--json",
            env=env,
        ).stdout
    )
    assert created["method"]["supervised"]["hyperparameters"]["n_epochs"] == 1
    assert created["method"]["supervised"]["hyperparameters"]["training_type"] == "dora"
    assert json.loads(cli("jobs", "pause", created["id"], "--json", env=env).stdout)["status"] == "paused"
    assert json.loads(cli("jobs", "resume", created["id"], "--json", env=env).stdout)["status"] == "queued"
    assert json.loads(cli("jobs", "cancel", created["id"], "--json", env=env).stdout)["status"] == "cancelled"
    assert json.loads(cli("files", "delete", uploaded["id"], "--json", env=env).stdout)["deleted"] is True


def test_distributed_celery_worker_with_openai_client(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    with fresh_postgres_database() as database_url:
        env = distributed_env(tmp_path / "data", database_url, redis_url)
        cli("models", "add", "tiny-llama", str(tiny_model_dir), env=env)
        port = free_port()
        health = f"http://127.0.0.1:{port}/healthz"
        with (
            process(["worker"], env, tmp_path / "worker.log"),
            process(["api", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path / "api.log", health),
        ):
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=create_key(env), max_retries=0
            )
            job = run_job(client, tmp_path, "tiny-llama")
            check_outputs(client, job, "tiny-llama")
            # A message delivered again after the job finished changes nothing.
            events_before = len(list(client.fine_tuning.jobs.list_events(job.id, limit=1000)))
            settings = Settings(broker_url=redis_url, worker_queue=env["FTJOBS_WORKER_QUEUE"])
            make_celery(settings).send_task(RUN_JOB, args=[job.id], queue=settings.worker_queue)
            time.sleep(3)
            assert len(list(client.fine_tuning.jobs.list_events(job.id, limit=1000))) == events_before
            assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
        worker_log = (tmp_path / "worker.log").read_text()
        assert "ftjobs.run_job" in worker_log
        check_adapter(
            tmp_path / "data" / "artifacts" / "jobs" / job.id / "attempt-1" / "adapter", tiny_model_dir
        )


def rft_files(client: openai.OpenAI, tmp_path: Path) -> list[str]:
    """A reinforcement job's training (10 prompts) and validation (3) files, with answers for graders."""
    files = []
    for name, rows in (("train", range(10)), ("valid", range(50, 53))):
        path = tmp_path / f"{name}.jsonl"
        lines = (
            {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}], "answer": str(2 * i)}
            for i in rows
        )
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        with open(path, "rb") as file:
            files.append(client.files.create(file=file, purpose="fine-tune").id)
    return files


def rft_job(
    client: openai.OpenAI,
    files: list[str],
    grader: Mapping[str, object],
    eval_interval: int,
    max_completion_tokens: int,
) -> FineTuningJob:
    """A one-epoch RFT LoRA job on the tiny model with `grader`, run to success."""
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=files[0],
        validation_file=files[1],
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": grader,  # type: ignore[typeddict-item]
                "hyperparameters": {
                    "n_epochs": 1,
                    "batch_size": 5,
                    "eval_interval": eval_interval,
                    "max_completion_tokens": max_completion_tokens,  # type: ignore[typeddict-unknown-key]
                    "lora_r": 4,
                },
            },
        },
    )
    return succeeded(client, job)


def test_reinforcement_job_with_openai_client(embedded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An RFT LoRA job on the tiny model runs two GRPO steps and reports rewards: the baseline's and each
    step's in events, each checkpoint's, in the results file and in the job's evaluation."""
    client, _ = embedded
    files = rft_files(client, tmp_path)
    grader = {
        "type": "text_similarity",
        "name": "close",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "evaluation_metric": "fuzzy_match",
    }
    job = rft_job(client, files, grader, eval_interval=1, max_completion_tokens=8)
    assert (
        job.method and job.method.reinforcement and job.method.reinforcement.grader.type == "text_similarity"
    )
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = {e.data["step"]: e.data for e in events if e.type == "metrics" and e.data}  # type: ignore[index]
    assert sorted(metrics) == [0, 1, 2] and "full_valid_mean_reward" in metrics[0]
    assert all({"train_mean_reward", "full_valid_mean_reward"} <= set(metrics[step]) for step in (1, 2))
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [2, 1]
    assert all(
        c.metrics.model_extra and "full_valid_mean_reward" in c.metrics.model_extra for c in checkpoints
    )
    csv = client.files.content(job.result_files[0]).text.splitlines()
    assert "full_valid_mean_reward" in csv[0].split(",") and len(csv) == 4
    evaluation = (job.model_extra or {})["evaluation"]
    assert evaluation["metric"] == "full_valid_mean_reward"
    assert evaluation["baseline"]["step"] == 0 and evaluation["tuned"]["step"] == 2
    assert evaluation["best_checkpoint"]["metric"] == "full_valid_mean_reward"


def judge_served(client: openai.OpenAI) -> bool:
    """Whether the inference server answers for the judge yet (`ftjobs up` starts it beside the API)."""
    try:
        client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=1
        )
    except openai.InternalServerError:  # 503 inference_unavailable
        return False
    return True


JUDGE_INPUT = [
    {"role": "system", "content": "You grade answers to sums."},
    {"role": "user", "content": "Expected {{item.answer}}; the answer was: {{sample.output_text}}"},
]


@pytest.mark.parametrize(
    "grader",
    [
        {
            "type": "score_model",
            "name": "judge",
            "model": "tiny-llama",
            "input": JUDGE_INPUT,
            "range": [0, 10],
        },
        {  # OpenAI's reinforcement method takes a label_model grader only inside a multi grader
            "type": "multi",
            "name": "labelled",
            "calculate_output": "judge",
            "graders": {
                "judge": {
                    "type": "label_model",
                    "name": "judge",
                    "model": "tiny-llama",
                    "input": JUDGE_INPUT,
                    "labels": ["right", "wrong"],
                    "passing_labels": ["right"],
                }
            },
        },
    ],
    ids=["score_model", "label_model"],
)
def test_model_graders_judge_reinforcement_jobs_on_the_inference_server(  # type: ignore[no-untyped-def]
    embedded, tmp_path: Path, grader: dict[str, object]
) -> None:
    """The served tiny base judges each sampled answer through `ftjobs up`'s inference server, admitted by
    the job's grant: every judge call is answered (a random judge's reply rarely holds a score, which
    scores 0 and says so), and the rewards are the job's metrics."""
    client, _ = embedded
    wait_for(lambda: judge_served(client), 120, "the inference server")
    job = rft_job(client, rft_files(client, tmp_path), grader, eval_interval=2, max_completion_tokens=4)
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    warnings = [e.message for e in events if e.level == "warn"]
    assert not [w for w in warnings if "did not answer" in w], "\n".join(warnings)
    metrics = {e.data["step"]: e.data for e in events if e.type == "metrics" and e.data}  # type: ignore[index]
    assert sorted(metrics) == [0, 1, 2], metrics
    top = 10.0 if grader["type"] == "score_model" else 1.0  # the score's range; a label scores 0 or 1
    assert all(0.0 <= metrics[step]["full_valid_mean_reward"] <= top for step in (0, 2)), metrics
    assert all(0.0 <= metrics[step]["train_mean_reward"] <= top for step in (1, 2)), metrics
    if grader["type"] == "multi":
        assert metrics[2]["full_valid_mean_reward_judge"] == metrics[2]["full_valid_mean_reward"]
