"""The pre-flight estimate (POST /v1/fine_tuning/preflight), through the API with the inference server's app
in-process, on the tiny model and real files: its counts are what the training code counts when the job
runs, the loss-mask preview marks exactly the assistant turns, the memory estimate follows the method and
the batch, the duration uses the throughput a real earlier job measured, and bad requests get job
creation's own 400s."""

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from transformers import LlamaConfig

from api.jobs.schemas import JobCreate
from api.preflight import service
from api.preflight.router import inference_client
from api.preflight.service import HISTORY_JOBS, throughput
from inference.app import create_app as create_inference_app
from inference.preflight import localized
from inference.preflight.bounded import bounded_estimate
from inference.preflight.memory import estimate_job_memory
from models.db import session_scope
from models.errors import APIError
from models.jobs import CompletedData, JobRepository, StartedData
from models.orm import Job, JobEvent
from models.preflight import SCALING_EFFICIENCY, Device, Memory, PreflightRequest
from models.registry import ModelRegistry
from models.scheduling import Capacity, Workers
from models.settings import Settings
from models.spec import DeviceInfo, ResolvedHyperparameters, TrainingSpec
from models.states import JobStatus
from models.storage import LocalArtifactStore
from tests.conftest import Tenant, make_tenant
from tests.test_api_models import openai_client
from tests.test_objective_jobs import CASES, jsonl
from tests.tiny_model import build_tiny_bert
from worker.runner import JobRunner
from worker.training.data import Example
from worker.training.loading import load_tokenizer

SYSTEM = {"role": "system", "content": "Answer in one short sentence."}
SHORT = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is two plus two?", "Two plus two is four."),
]
LONG_ANSWER = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 3
MAX_SEQ_LENGTH = 96
"""Long enough for the short examples, short enough to cut the long answers."""


def chat(question: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [SYSTEM, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    }


def training_lines() -> bytes:
    """Twelve chat examples, four of them with an answer longer than MAX_SEQ_LENGTH allows."""
    examples = [chat(*SHORT[i % len(SHORT)]) for i in range(8)]
    examples += [chat("Describe the fox.", LONG_ANSWER) for _ in range(4)]
    return b"".join(json.dumps(example).encode() + b"\n" for example in examples)


def upload(client: TestClient, content: bytes, headers: dict[str, str] | None = None) -> str:
    files = {"file": ("data.jsonl", io.BytesIO(content))}
    response = client.post("/v1/files", files=files, data={"purpose": "fine-tune"}, headers=headers)
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


def body(model: str, training_file: str, **hyperparameters: Any) -> dict[str, Any]:
    hp = {"n_epochs": 1, "batch_size": 4, "max_seq_length": MAX_SEQ_LENGTH, **hyperparameters}
    return {
        "model": model,
        "training_file": training_file,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
    }


def answered_by(client: TestClient, settings: Settings) -> TestClient:
    """The API with an inference server's app of these settings answering its internal requests in-process."""
    inference = create_inference_app(settings)

    async def in_process() -> AsyncIterator[httpx.AsyncClient]:
        transport = httpx.ASGITransport(app=inference)
        async with httpx.AsyncClient(transport=transport, base_url="http://inference") as answering:
            yield answering

    client.app.dependency_overrides[inference_client] = in_process  # type: ignore[attr-defined]
    return client


@pytest.fixture
def api(client: TestClient, settings: Settings, registered_model: str) -> TestClient:
    return answered_by(client, settings)


def preflight(api: TestClient, request: dict[str, Any]) -> dict[str, Any]:
    response = api.post("/v1/fine_tuning/preflight", json=request)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def events(api: TestClient, job_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = api.get(
        f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}
    ).json()["data"]
    return data


def test_counts_are_the_jobs_and_the_duration_its_measured_throughput(
    api: TestClient, settings: Settings, session_factory: sessionmaker[Session], registered_model: str
) -> None:
    request = body(registered_model, upload(api, training_lines()))
    before = preflight(api, request)
    assert before["object"] == "fine_tuning.preflight" and before["model"] == registered_model
    assert (before["method"], before["training_type"], before["max_seq_length"]) == (
        "supervised",
        "lora",
        MAX_SEQ_LENGTH,
    )
    stats = before["training_file"]
    assert stats["n_examples"] == 12 and 0 < stats["n_truncated"] < 12
    assert stats["max_example_tokens"] == MAX_SEQ_LENGTH and 0 < stats["n_trained_tokens"] < stats["n_tokens"]
    assert before["validation_file"] is None
    # No job has run: no device reported, no throughput measured.
    assert before["memory"]["device"]["source"] == "the inference server"
    assert before["duration"] == {
        "estimated_seconds": None,
        "tokens_per_second": None,
        "based_on_jobs": 0,
        "n_epochs": 1,
        "tokens_to_train": stats["n_tokens"],
        "range_test_tokens": 0,  # 12 examples once in batches of 4: too short for a learning-rate test
        "devices": 1,
        "scaling_efficiency": 1.0,
    }
    assert any("duration is unknown" in w for w in before["warnings"])
    assert any("device" in w for w in before["warnings"])
    assert api.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was created

    job_id = api.post("/v1/fine_tuning/jobs", json=request).json()["id"]
    JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root)).run(job_id)
    job = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]

    # What the trainer reported: rows, cuts, tokens (and the same truncation warning).
    [started] = [e["data"] for e in events(api, job_id) if e["data"] and "device" in e["data"]]
    assert started["n_train_examples"] == stats["n_rows"]
    assert started["truncated_examples"] == stats["n_truncated"]
    assert job["trained_tokens"] == before["duration"]["tokens_to_train"]
    messages = {e["message"] for e in events(api, job_id)}
    assert {w for w in before["warnings"] if "max_seq_length" in w} <= messages

    after = preflight(api, request)
    [measured] = [e["data"] for e in events(api, job_id) if e["data"] and "elapsed_seconds" in e["data"]]
    rate = measured["trained_tokens"] / measured["elapsed_seconds"]
    duration = after["duration"]
    assert duration["based_on_jobs"] == 1
    assert duration["tokens_per_second"] == pytest.approx(rate)
    assert duration["estimated_seconds"] == pytest.approx(duration["tokens_to_train"] / rate)
    assert after["memory"]["device"] == {
        **started["device"],
        "source": "the worker of the latest job to start",
    }
    assert not any("duration is unknown" in w or "device" in w for w in after["warnings"])
    # Long enough for a learning-rate range test: 30 epochs of 12 rows in batches of 1 afford 18 test steps
    # (5 % of 360 examples). The duration counts its tokens, beside the ones the job will report trained.
    tested = preflight(api, body(registered_model, request["training_file"], n_epochs=30, batch_size=1))
    assert (tested["learning_rate_test_examples"], before["learning_rate_test_examples"]) == (18, 0)
    test_tokens = tested["duration"]["range_test_tokens"]
    assert test_tokens == round(stats["n_tokens"] * 18 / stats["n_rows"])
    expected = (tested["duration"]["tokens_to_train"] + test_tokens) / rate
    assert tested["duration"]["estimated_seconds"] == pytest.approx(expected)
    # On 2 devices: the measured throughput twice over, at the strategy's scaling efficiency.
    two = preflight(api, {**request, "compute": {"devices": 2}})
    efficiency = SCALING_EFFICIENCY["ddp"]
    assert (two["duration"]["devices"], two["duration"]["scaling_efficiency"]) == (2, efficiency)
    assert two["duration"]["tokens_per_second"] == pytest.approx(rate * 2 * efficiency)
    assert (two["memory"]["devices"], two["memory"]["strategy"]) == (2, "ddp")
    # Workers of 1 CPU device (the one that ran the job, and one more): no live worker could run it.
    with session_scope(session_factory) as session:
        Workers(session).register("one-cpu", Capacity(1, "cpu"), now=time.time())
    waits = preflight(api, {**request, "compute": {"devices": 2}})["memory"]
    assert waits["fits"] is False and "a worker with 2 device(s)" in waits["reason"], waits
    with session_scope(session_factory) as session:
        Workers(session).register("two-cpu", Capacity(2, "cpu"), now=time.time())
    assert preflight(api, {**request, "compute": {"devices": 2}})["memory"]["reason"] is None
    # Another training type's throughput is its own: the lora job does not count for dora.
    dora = preflight(api, body(registered_model, request["training_file"], training_type="dora"))
    assert dora["duration"]["based_on_jobs"] == 0 and dora["duration"]["tokens_per_second"] is None

    # The job's results file has purpose fine-tune-results: refused as job creation refuses it.
    refused = body(registered_model, job["result_files"][0])
    answer = api.post("/v1/fine_tuning/preflight", json=refused)
    assert answer.json()["error"]["code"] == "invalid_file_purpose"
    assert (answer.status_code, answer.json()) == same_as_creation(api, refused)


def history_job(
    session: Session, *, started_at: int, training_type: str = "lora", status: JobStatus = JobStatus.SUCCEEDED
) -> str:
    """Test setup only: a job as the runner leaves it once it has run."""
    job_id = f"ftjob-{time.perf_counter_ns()}"
    method = {"type": "supervised", "supervised": {"hyperparameters": {}}}
    session.add(
        Job(
            id=job_id,
            organization_id="org-local",
            model="base",
            training_file="file-x",
            status=status.value,
            method=method,
            hyperparameters=ResolvedHyperparameters(
                training_type=training_type,
                n_epochs=1,
                batch_size=1,
                learning_rate_multiplier=1.0,
                learning_rate=2e-4,
            ),
            seed=1,
            result_files=[],
            created_at=started_at - 1,
            started_at=started_at,
            finished_at=started_at + 60,
            attempt=1,
        )
    )
    session.flush()
    JobRepository(session).add_event(job_id, "Created fine-tuning job", data={})
    return job_id


def test_the_history_reads_the_event_data_the_runner_writes(session_factory: sessionmaker[Session]) -> None:
    """The device and throughput come from the runner's typed event data, on Postgres and SQLite alike;
    other events, unmeasured runs and other training types are left out."""
    cpu = DeviceInfo(type="cpu", name="CPU (2 cores)", total_bytes=2**34)
    with session_scope(session_factory) as session:
        repo = JobRepository(session)
        assert repo.latest_device(jobs=HISTORY_JOBS) is None
        measured = history_job(session, started_at=1000)
        started = StartedData(total_steps=3, n_train_examples=12, truncated_examples=4, device=cpu)
        repo.add_event(measured, "Training 12 examples in 3 steps on CPU (2 cores)", data=started)
        repo.add_event(measured, "Step 3/3", type="metrics", data={"step": 3, "elapsed_seconds": 1.0})
        repo.add_event(measured, "done", data=CompletedData(trained_tokens=1200, elapsed_seconds=8.0))
        # A later job whose trainer reported no device, and whose run was not timed.
        unmeasured = history_job(session, started_at=2000)
        repo.add_event(unmeasured, "Training", data=StartedData(total_steps=3, n_train_examples=12))
        repo.add_event(unmeasured, "done", data=CompletedData(trained_tokens=1200))
        other = history_job(session, started_at=500, training_type="dora")
        repo.add_event(other, "done", data=CompletedData(trained_tokens=50, elapsed_seconds=1.0))
        running = history_job(session, started_at=600, status=JobStatus.RUNNING)
        repo.add_event(running, "done", data=CompletedData(trained_tokens=50, elapsed_seconds=1.0))
    with session_scope(session_factory) as session:
        repo = JobRepository(session)
        # Stored with the keys docs/api.md lists for the event.
        assert session.scalar(select(JobEvent.data).where(JobEvent.message.startswith("Training 12"))) == {
            "total_steps": 3,
            "n_train_examples": 12,
            "truncated_examples": 4,
            "device": {"type": "cpu", "name": "CPU (2 cores)", "total_bytes": 2**34},
        }
        assert repo.latest_device(jobs=HISTORY_JOBS) == cpu
        assert repo.latest_device(jobs=1) is None  # the latest job to start reported none
        assert throughput(session, "base", "supervised", "lora") == (1200 / 8.0, 1)
        assert throughput(session, "base", "supervised", "dora") == (50.0, 1)
        assert throughput(session, "other-base", "supervised", "lora") == (None, 0)
        # The latest lora job to finish was not timed.
        assert repo.measured_throughputs("base", "supervised", "lora", jobs=1) == []


def rendered_answers(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The text of each weighted assistant turn as the chat template renders it (end of turn included)."""
    answers = ""
    for i, message in enumerate(messages):
        if i and message["role"] == "assistant" and message.get("weight", 1):
            turn = {k: v for k, v in message.items() if k != "weight"}
            before = [{k: v for k, v in m.items() if k != "weight"} for m in messages[:i]]
            prompt = tokenizer.apply_chat_template(before, add_generation_prompt=True, tokenize=False)
            through = tokenizer.apply_chat_template([*before, turn], tokenize=False)
            answers += through[len(prompt) :]
    return answers


def test_the_loss_mask_preview_trains_exactly_the_assistant_turns(
    api: TestClient, registered_model: str, tiny_model_dir: Path
) -> None:
    multi_turn = [
        SYSTEM,
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris.", "weight": 0},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "The capital of Spain is Madrid."},
    ]
    first = [{"messages": multi_turn}, chat(*SHORT[1]), chat("Describe the fox.", LONG_ANSWER)]
    lines = b"".join(json.dumps(e).encode() + b"\n" for e in first) + training_lines()
    # Through the openai client's generic request, as an SDK user would call the extension.
    sdk = openai_client(api)
    report = sdk.post(
        "/fine_tuning/preflight", body=body(registered_model, upload(api, lines)), cast_to=object
    )
    assert isinstance(report, dict)
    preview = report["loss_mask_preview"]
    assert len(preview) == 3
    tokenizer = load_tokenizer(str(tiny_model_dir))
    for shown, example in zip(preview[:2], first[:2], strict=True):
        trained = "".join(s["text"] for s in shown["segments"] if s["trained"])
        assert trained == rendered_answers(tokenizer, example["messages"])
        assert "Paris." not in trained  # the weight-0 turn is context
        whole = tokenizer.apply_chat_template(example["messages"], tokenize=False)
        assert "".join(s["text"] for s in shown["segments"]) == whole
        assert not shown["truncated"]
        assert shown["n_tokens"] == len(tokenizer(whole, add_special_tokens=False)["input_ids"])
    # The long answer is cut at max_seq_length: trained up to there, and flagged.
    long = preview[2]
    assert long["truncated"] and long["n_tokens"] == MAX_SEQ_LENGTH
    trained = "".join(s["text"] for s in long["segments"] if s["trained"])
    assert trained and LONG_ANSWER.startswith(trained)


def same_as_creation(api: TestClient, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    created = api.post("/v1/fine_tuning/jobs", json=request)
    return created.status_code, created.json()


def bad_requests(model: str, file_id: str) -> dict[str, dict[str, Any]]:
    good = body(model, file_id)
    method = good["method"]["supervised"]["hyperparameters"]
    return {
        "unknown-file": {**good, "training_file": "file-doesnotexist"},
        "unknown-validation-file": {**good, "validation_file": "file-doesnotexist"},
        "unknown-model": {**good, "model": "no-such-model"},
        "lora_r-with-full": body(model, file_id, training_type="full", lora_r=4),
        "n_epochs-0": body(model, file_id, n_epochs=0),
        "dpo-on-chat": {**good, "method": {"type": "dpo", "dpo": {"hyperparameters": method}}},
        "hyperparameters-twice": {**good, "hyperparameters": {"n_epochs": 1}},
        "unknown-field": {**good, "epochs": 1},
        "two-nodes": {**good, "compute": {"nodes": 2}},
    }


def test_bad_requests_get_the_400s_of_job_creation(api: TestClient, registered_model: str) -> None:
    file_id = upload(api, training_lines())
    for name, request in bad_requests(registered_model, file_id).items():
        answer = api.post("/v1/fine_tuning/preflight", json=request)
        assert answer.status_code == 400, (name, answer.text)
        assert (answer.status_code, answer.json()) == same_as_creation(api, request), name
    assert api.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_what_the_job_would_fail_on_is_a_400_now(api: TestClient, registered_model: str) -> None:
    """Job creation accepts these and the job fails while validating or starting; the pre-flight says why
    at once, with the job's own error."""
    too_few = body(
        registered_model,
        upload(api, b"".join(json.dumps(chat(*SHORT[0])).encode() + b"\n" for _ in range(5))),
    )
    answer = api.post("/v1/fine_tuning/preflight", json=too_few)
    error = answer.json()["error"]
    assert answer.status_code == 400 and (error["code"], error["param"]) == (
        "invalid_n_examples",
        "training_file",
    )
    assert error["message"] == "Training file has 5 example(s), but must have at least 10 examples"
    not_json = body(registered_model, upload(api, b"not json\n" * 10))
    answer = api.post("/v1/fine_tuning/preflight", json=not_json)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_file_format"


def test_another_organisations_file_is_a_file_that_does_not_exist(
    api: TestClient, session_factory: sessionmaker[Session], registered_model: str
) -> None:
    other: Tenant = make_tenant(session_factory, "other-team")
    theirs = upload(api, training_lines(), headers=other.headers)
    mine = api.post("/v1/fine_tuning/preflight", json=body(registered_model, theirs), headers=other.headers)
    assert mine.status_code == 200, mine.text
    answer = api.post("/v1/fine_tuning/preflight", json=body(registered_model, theirs))
    absent = api.post("/v1/fine_tuning/preflight", json=body(registered_model, f"{theirs}0"))
    assert answer.status_code == absent.status_code == 400
    assert answer.json() == json.loads(absent.text.replace(f"{theirs}0", theirs))


def spec(model_dir: Path, training_type: str, **overrides: Any) -> TrainingSpec:
    hyperparameters = {
        "training_type": training_type,
        "n_epochs": 1,
        "batch_size": 2,
        "learning_rate_multiplier": 1.0,
        "learning_rate": 1e-4,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target_modules": "all-linear",
        "max_seq_length": 128,
        "warmup_ratio": 0.0,
        **overrides,
    }
    return TrainingSpec(
        job_id="test",
        base_model_path=str(model_dir),
        training_file="train.jsonl",
        data_format="chat",
        objective="sft",
        output_dir="",
        stop_file="",
        seed=0,
        hyperparameters=ResolvedHyperparameters.model_validate(hyperparameters),
    )


def rows(length: int) -> list[Example]:
    """Chat-like rows: the first half prompt, the second half answer."""
    half = length // 2
    return [Example([5] * length, [-100] * half + [5] * (length - half)) for _ in range(4)]


GPU = Device(type="cuda", name="a GPU", total_bytes=24 * 2**30, source="test")
CPU = Device(type="cpu", name="a CPU", total_bytes=None, source="test")


def test_the_memory_estimate_follows_method_batch_and_length(tmp_path: Path) -> None:
    # Only the config is read: a model shaped like a real one, where the linear layers outweigh the
    # embeddings (in the tiny test model they do not, and QLoRA's float32 embeddings would outweigh the rest).
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4
    )
    config.save_pretrained(tmp_path)

    def memory(training_type: str, device: Device = GPU, length: int = 64, **hp: Any) -> dict[str, Any]:
        estimate = estimate_job_memory(spec(tmp_path, training_type, **hp), rows(length), device)
        return estimate.model_dump()

    lora = memory("lora")
    assert lora["estimated_bytes"] == sum(lora["breakdown"].values()) and lora["fits"] is True
    assert 0 < lora["trainable_parameters"] < lora["total_parameters"]
    assert memory("lora", batch_size=8)["breakdown"]["activations"] > lora["breakdown"]["activations"]
    assert memory("lora", length=128)["breakdown"]["activations"] > lora["breakdown"]["activations"]
    assert memory("lora", lora_dropout=0.05)["breakdown"]["activations"] > lora["breakdown"]["activations"]
    checkpointed = memory("lora", gradient_checkpointing=True)["breakdown"]["activations"]
    assert checkpointed < lora["breakdown"]["activations"]
    # On CPU the allocator keeps what checkpointing frees: it is not credited there.
    cpu_activations = [
        memory("lora", CPU, gradient_checkpointing=c)["breakdown"]["activations"] for c in (False, True)
    ]
    assert cpu_activations[0] == cpu_activations[1]
    # On a GPU a frozen base loads in 16 bits and QLoRA's in 4; a fully trained one keeps float32 masters.
    weights = {t: memory(t)["breakdown"]["weights"] for t in ("qlora", "lora", "full")}
    assert weights["qlora"] < weights["lora"] < weights["full"]
    totals = {t: memory(t, CPU)["estimated_bytes"] for t in ("qlora", "lora", "full")}
    assert totals["qlora"] < totals["lora"] < totals["full"]
    assert memory("full", CPU)["fits"] is None  # its memory unknown
    tiny_gpu = GPU.model_copy(update={"total_bytes": 2**20})
    assert memory("full", tiny_gpu)["fits"] is False


def test_the_memory_estimate_is_per_device_for_the_strategy(tmp_path: Path) -> None:
    LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4
    ).save_pretrained(tmp_path)

    def memory(training_type: str, devices: int, device: Device = GPU) -> Memory:
        return estimate_job_memory(spec(tmp_path, training_type, batch_size=8), rows(64), device, devices)

    # Sharded (full): each device holds about 1/N of the weights and of the trained state.
    one, four = memory("full", 1), memory("full", 4)
    assert (one.strategy, four.strategy, four.devices) == ("single", "fsdp", 4)
    assert four.breakdown.trainable_and_optimizer == one.breakdown.trainable_and_optimizer // 4
    # A quarter of the weights, plus the root unit and two blocks gathered to compute.
    assert one.breakdown.weights / 4 < four.breakdown.weights < one.breakdown.weights * 3 / 4
    assert memory("full", 8).breakdown.weights < four.breakdown.weights
    assert four.breakdown.activations < one.breakdown.activations  # a quarter of each batch
    # Data-parallel (lora): a whole replica each, and a flat gradient buffer for the all-reduce.
    one, two = memory("lora", 1), memory("lora", 2)
    assert two.strategy == "ddp" and two.breakdown.weights == one.breakdown.weights
    assert two.breakdown.trainable_and_optimizer > one.breakdown.trainable_and_optimizer
    # Too big for the device: fits is false, with the reason and what would help.
    small = GPU.model_copy(update={"total_bytes": 2**20})
    refused = memory("full", 2, small)
    assert refused.fits is False and refused.reason and "each of 2 devices (fsdp)" in refused.reason
    assert "add devices" in refused.reason
    assert "more devices do not help" in (memory("lora", 2, small).reason or "")
    assert memory("full", 2).reason is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database is not what varies
@pytest.mark.parametrize("case", list(CASES))
def test_every_objective_gets_its_estimate(
    case: str, api: TestClient, session_factory: sessionmaker[Session], registered_model: str, tmp_path: Path
) -> None:
    base, method_type, train, valid, hyperparameters = CASES[case]
    model = registered_model
    if base == "bert":
        with session_scope(session_factory) as session:
            ModelRegistry(session).register("tiny-bert", str(build_tiny_bert(tmp_path / "bert")), "local")
        model = "tiny-bert"
    request = {
        "model": model,
        "training_file": upload(api, jsonl(train)),
        "validation_file": upload(api, jsonl(valid)),
        "method": {"type": method_type, method_type: {"hyperparameters": hyperparameters}},
    }
    report = preflight(api, request)
    assert report["training_file"]["n_examples"] == len(train)
    assert report["validation_file"]["n_examples"] == len(valid)
    preview = report["loss_mask_preview"]
    assert len(preview) == 3 and all(example["segments"] for example in preview)
    trained = [s for example in preview for s in example["segments"] if s["trained"]]
    memory = report["memory"]
    assert memory["estimated_bytes"] > 0 and memory["total_parameters"] > 0
    if case in ("classification", "feature_extraction", "reward"):  # scored per row, not per token
        assert not trained and report["training_file"]["n_trained_tokens"] == 0
    else:
        assert trained and report["training_file"]["n_trained_tokens"] > 0
    if case in ("classification", "feature_extraction"):
        assert [example["label"] for example in preview] == [str(row["label"]) for row in train[:3]]
    if case in ("dpo", "reward"):
        assert all(example["non_preferred_segments"] for example in preview)
    if case == "dpo":  # the preferred answer, its end of turn included, is what is trained
        [answer] = train[0]["preferred_output"]
        assert "".join(s["text"] for s in preview[0]["segments"] if s["trained"]).startswith(
            answer["content"]
        )
    if case == "feature_extraction":  # one pass, no gradient
        assert report["n_epochs"] == 1 and memory["trainable_parameters"] == 0


def pathological_lines() -> bytes:
    """The security review's file (finding 4b): one 10 MB system message, then ten ordinary examples."""
    system = {"role": "system", "content": "word " * 2_097_152}
    big = {"messages": [system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    examples = [big, *(chat(f"q{i}", f"a{i}") for i in range(10))]
    return b"".join(json.dumps(example).encode() + b"\n" for example in examples)


def preflight_children(inference: psutil.Process) -> list[psutil.Process]:
    """The pre-flights running for an inference server (here, or a process of its own): its fork server's
    children."""
    return [
        child
        for server in inference.children(recursive=True)
        if "forkserver" in " ".join(server.cmdline())
        for child in server.children()
    ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database is not what varies
def test_a_pathological_file_costs_at_most_the_time_limit_and_never_the_servers_memory(
    api: TestClient, settings: Settings, registered_model: str
) -> None:
    """Unbounded, this file took 117 s of CPU and 2.2 GB of the inference server (tokenized with offsets)."""
    preflight(api, body(registered_model, upload(api, training_lines())))  # the fork server is up
    limited = answered_by(api, settings.model_copy(update={"preflight_timeout_seconds": 4}))
    request = body(registered_model, upload(limited, pathological_lines()))
    server = psutil.Process()  # the API and the inference server's app, in this test
    before, started = server.memory_info().rss, time.monotonic()
    answer = limited.post("/v1/fine_tuning/preflight", json=request)
    elapsed = time.monotonic() - started
    error = answer.json()["error"]
    assert answer.status_code == 400 and (error["code"], error["param"]) == (
        "preflight_too_costly",
        "training_file",
    )
    assert "took more than 4 s (FTJOBS_PREFLIGHT_TIMEOUT_SECONDS)" in error["message"]
    assert elapsed < 4 + 10
    assert server.memory_info().rss - before < 50 * 2**20  # the child paid, and it is gone
    assert not preflight_children(psutil.Process())


def inference_request(
    session_factory: sessionmaker[Session], settings: Settings, tenant: Tenant, request: dict[str, Any]
) -> PreflightRequest:
    """What the API sends the inference server for this job body, with its files found in the store as the
    inference server finds them."""
    store = LocalArtifactStore(settings.artifacts_root)
    with session_scope(session_factory) as session:
        body = JobCreate.model_validate(request)
        sent = service.inference_request(session, store, settings, tenant.id, body)
    return localized(sent, store)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database is not what varies
def test_the_child_is_stopped_at_its_memory_bound_and_when_its_caller_leaves(
    api: TestClient,
    settings: Settings,
    session_factory: sessionmaker[Session],
    tenant: Tenant,
    registered_model: str,
) -> None:
    request = inference_request(
        session_factory, settings, tenant, body(registered_model, upload(api, pathological_lines()))
    )

    async def there() -> bool:
        return False

    started = time.monotonic()
    with pytest.raises(APIError) as stopped:
        asyncio.run(bounded_estimate(request, 600, there, memory_bytes=256 * 2**20))
    assert (stopped.value.status_code, stopped.value.code) == (400, "preflight_too_costly")
    assert "needed more than 0.25 GiB" in stopped.value.message
    assert time.monotonic() - started < 60
    assert not preflight_children(psutil.Process())

    running: list[psutil.Process] = []

    async def leaves() -> bool:  # the caller hangs up once the child has done a second of work
        running[:] = preflight_children(psutil.Process())
        return bool(running) and all(child.cpu_times().user > 1 for child in running)

    with pytest.raises(APIError) as left:
        asyncio.run(bounded_estimate(request, 600, leaves))
    assert left.value.status_code == 499 and running
    assert not any(child.is_running() for child in running) and not preflight_children(psutil.Process())
