"""One job per objective through the API, trained by the real runner and training child on tiny models:
each succeeds and reports its objective's metrics on the job (baseline vs tuned, best checkpoint), on its
checkpoints, in its events and in its results file. Postgres only: the database paths are the same for
every objective and are covered on both databases by test_runner."""

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from inference.app import create_app as create_inference_app
from models.db import session_scope
from models.objectives import EVAL_METRICS
from models.registry import ModelRegistry
from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.tiny_model import build_tiny_bert
from tests.training.classifier_jobs import sentences, texts
from tests.training.test_preference import record as preference_record
from worker.runner import JobRunner

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


def jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def upload(client: TestClient, content: bytes) -> str:
    files = {"file": ("data.jsonl", io.BytesIO(content))}
    return client.post("/v1/files", files=files, data={"purpose": "fine-tune"}).json()["id"]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


CASES = {
    # objective: (base, method type, training rows, validation rows, hyperparameters)
    "pretrain": (
        "llama", "supervised",
        [{"text": f"Numbers: {' '.join(str(j) for j in range(i, i + 30))}."} for i in range(12)],
        [{"text": "Numbers: 3 4 5 6 7 8 9 10 11 12."}],
        {"training_type": "lora", "max_seq_length": 32, "learning_rate": 1e-2},
    ),
    "classification": (
        "llama", "supervised", texts(24, seed=1), texts(8, seed=2),
        {"training_type": "lora", "learning_rate": 1e-2, "eval_steps": 2},
    ),
    "feature_extraction": (
        "bert", "supervised", texts(24, seed=1), texts(8, seed=2), {"training_type": "feature_extraction"},
    ),
    "token_classification": (
        "bert", "supervised", sentences(24, seed=1), sentences(8, seed=2),
        {"training_type": "full", "learning_rate": 1e-3},
    ),
    "dpo": (
        "llama", "dpo",
        [preference_record(i) for i in range(12)], [preference_record(i) for i in range(50, 54)],
        {"training_type": "lora", "learning_rate": 2e-2, "beta": 0.5},
    ),
    "reward": (
        "llama", "reward_model", [preference_record(i) for i in range(12)],
        [preference_record(i) for i in range(50, 54)], {"training_type": "lora", "learning_rate": 2e-2},
    ),
}  # fmt: skip
OBJECTIVE = {"feature_extraction": "classification"}
"""The objective a case trains, where it is not the case's name."""


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_every_objective_trains_through_the_api_and_reports_its_metrics(
    case: str,
    client: TestClient,
    settings: Settings,
    session_factory,  # type: ignore[no-untyped-def]
    registered_model: str,
    tiny_bert_dir: Path,
) -> None:
    base, method_type, train, valid, hyperparameters = CASES[case]
    objective = OBJECTIVE.get(case, case)
    model = registered_model
    if base == "bert":
        with session_scope(session_factory) as session:
            ModelRegistry(session).register("tiny-bert", str(tiny_bert_dir), "local")
        model = "tiny-bert"
    body = {
        "model": model,
        "training_file": upload(client, jsonl(train)),
        "validation_file": upload(client, jsonl(valid)),
        "seed": 3,
        "method": {
            "type": method_type,
            method_type: {"hyperparameters": {"n_epochs": 2, "batch_size": 4, **hyperparameters}},
        },
    }
    created = client.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root)).run(job_id)

    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    full_metrics = {f"full_valid_{name}" for name in EVAL_METRICS[objective]}
    evaluation = job["evaluation"]
    assert set(evaluation["tuned"]["metrics"]) == full_metrics
    assert set(evaluation["gain"]) == full_metrics
    metric = evaluation["metric"]
    assert metric in full_metrics

    # The tuned model beats the untouched base on the objective's own metric.
    baseline, tuned = evaluation["baseline"]["metrics"], evaluation["tuned"]["metrics"]
    assert tuned["full_valid_loss"] < baseline["full_valid_loss"], (baseline, tuned)
    if objective == "classification":
        assert tuned["full_valid_accuracy"] > baseline["full_valid_accuracy"]
        details = evaluation["tuned"]["details"]
        assert details["labels"] == ["animal", "fruit"]
        assert sum(map(sum, details["confusion_matrix"])) == len(valid)

    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    if case == "feature_extraction":  # one solve: no steps, no checkpoints
        assert not checkpoints and "best_checkpoint" not in evaluation
    else:
        assert checkpoints and all(full_metrics <= set(c["metrics"]) for c in checkpoints)
        best = evaluation["best_checkpoint"]
        [best_checkpoint] = [c for c in checkpoints if c["id"] == best["id"]]
        assert best["metric"] == metric and best["value"] == best_checkpoint["metrics"][metric]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 200}).json()["data"]
    assert any(e["type"] == "metrics" and e["data"]["step"] == 0 for e in events)  # the baseline
    csv = client.get(f"/v1/files/{job['result_files'][0]}/content").text.splitlines()
    assert full_metrics <= set(csv[0].split(",")) and csv[1].startswith("0,")

    adapter = settings.artifacts_root / "jobs" / job_id / "attempt-1" / "adapter"
    if objective in ("classification", "token_classification"):
        labels = json.loads((adapter / "labels.json").read_text())["labels"]
        assert labels == (
            ["animal", "fruit"] if objective == "classification" else ["B-ANI", "B-FRU", "I-ANI", "O"]
        )
    assert not [p for p in adapter.rglob("*") if p.suffix in {".bin", ".pt", ".pkl", ".joblib"}]

    # The tuned model serves through the API's inference routes (here with the inference app in-process).
    inference = create_inference_app(settings)
    client.app.state.open_inference = lambda: httpx.AsyncClient(  # type: ignore[attr-defined]
        transport=httpx.ASGITransport(app=inference), base_url="http://inference"
    )
    model_id = job["fine_tuned_model"]
    if objective == "classification":
        answer = client.post(
            "/v1/classifications", json={"model": model_id, "input": [r["text"] for r in valid]}
        )
        assert answer.status_code == 200, answer.text
        data = answer.json()["data"]
        assert all(
            abs(sum(d["scores"].values()) - 1) < 1e-5 and d["score"] == max(d["scores"].values())
            for d in data
        )
        # Served predictions are the ones the job's own evaluation scored, at the step it published (the
        # best checkpoint's, which need not be the last: evaluation.tuned is the last's).
        accuracy = sum(d["label"] == r["label"] for d, r in zip(data, valid, strict=True)) / len(valid)
        published = client.get(f"/v1/models/{model_id}").json()["lineage"]
        assert published["step"] == job["published_step"]
        assert accuracy == pytest.approx(published["metrics"]["full_valid_accuracy"])
    elif objective in ("pretrain", "dpo"):
        answer = client.post(
            "/v1/completions", json={"model": model_id, "prompt": "Numbers: 3 4", "max_tokens": 4}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] > 0
    else:  # NER and reward models are not served
        refused = client.post(
            "/v1/chat/completions", json={"model": model_id, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_supported"
