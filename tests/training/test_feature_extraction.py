"""Feature extraction on a tiny BERT and a tiny Llama: a logistic regression on frozen mean-pooled embeddings
beats the majority-class baseline, reports like the recipe, and its pickle-free artifact reloads into the
same predictions."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from models.objectives import EVAL_METRICS
from models.spec import (
    CompletedMessage,
    EvaluationMessage,
    LogMessage,
    MetricsMessage,
    StartedMessage,
    TrainingSpec,
)
from tests.tiny_model import build_tiny_bert
from tests.training.classifier_jobs import (
    Recorder,
    files_of,
    job_spec,
    label_map,
    texts,
    write_jsonl,
)
from worker.training.device import describe, select_device
from worker.training.feature_extraction import head_probabilities, load_feature_extraction, run

LABELS = ["animal", "fruit"]
FULL_METRICS = {f"full_valid_{name}" for name in EVAL_METRICS["classification"]}
TRAIN = [*texts(32, seed=0), *(row for row in texts(16, seed=3) if row["label"] == "fruit")]
"""24 fruit and 16 animal texts: the majority-class baseline predicts fruit with probability 0.6."""
VALID = texts(16, seed=1)  # 8 and 8


@pytest.fixture(scope="module", params=["bert", "llama"])
def job(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> tuple[TrainingSpec, Recorder]:
    root = tmp_path_factory.mktemp(request.param)
    base = build_tiny_bert(root / "base") if request.param == "bert" else tiny_model_dir
    train, valid = write_jsonl(root / "train.jsonl", TRAIN), write_jsonl(root / "valid.jsonl", VALID)
    spec = job_spec(
        root / "job", base, "classification", LABELS, train, valid, training_type="feature_extraction"
    )
    events = Recorder()
    run(spec, events)
    return spec, events


def test_the_head_beats_the_majority_class_baseline(job: tuple[TrainingSpec, Recorder]) -> None:
    _, events = job
    assert [type(m).__name__ for m in events.messages if not isinstance(m, LogMessage)] == [
        "StartedMessage",
        "EvaluationMessage",
        "EvaluationMessage",
        "MetricsMessage",
        "CompletedMessage",
    ]
    device = describe(select_device())  # reported for the pre-flight estimate
    assert events.of_type(StartedMessage) == [
        StartedMessage(total_steps=1, n_train_examples=40, device=device)
    ]
    baseline, evaluation = events.of_type(EvaluationMessage)
    assert (baseline.step, baseline.baseline, evaluation.step, evaluation.baseline) == (0, True, 1, False)
    assert baseline.metrics == pytest.approx(
        {
            "full_valid_loss": -(math.log(0.6) + math.log(0.4)) / 2,  # the training label frequencies
            "full_valid_accuracy": 0.5,  # always "fruit"
            "full_valid_macro_f1": (0 + 2 / 3) / 2,
        }
    )
    assert evaluation.metrics["full_valid_accuracy"] >= 0.8
    assert evaluation.metrics["full_valid_loss"] < baseline.metrics["full_valid_loss"]
    assert sum(map(sum, evaluation.details["confusion_matrix"])) == 16

    (metrics,) = events.of_type(MetricsMessage)
    assert (metrics.step, metrics.total_steps) == (1, 1)
    assert set(metrics.metrics) == {"train_loss", "train_accuracy"} | FULL_METRICS
    assert metrics.metrics["train_accuracy"] >= 0.9
    assert {k: metrics.metrics[k] for k in FULL_METRICS} == evaluation.metrics
    (completed,) = events.of_type(CompletedMessage)
    assert completed.metrics == metrics.metrics
    with open(completed.results_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["step"], row["train_loss"] == "") for row in rows] == [("0", True), ("1", False)]


def test_the_artifact_holds_the_head_without_pickle(job: tuple[TrainingSpec, Recorder]) -> None:
    spec, events = job
    adapter = Path(events.of_type(CompletedMessage)[0].adapter_path)
    assert {"head.safetensors", "feature_extraction.json", "labels.json", "tokenizer.json"} <= files_of(
        adapter
    )
    head = load_file(adapter / "head.safetensors")
    hidden = json.loads((Path(spec.base_model_path) / "config.json").read_text())["hidden_size"]
    assert (head["coef"].shape, head["intercept"].shape) == ((1, hidden), (1,))  # binary: one score
    assert json.loads((adapter / "feature_extraction.json").read_text()) == {
        "training_type": "feature_extraction",
        "base_model_name_or_path": spec.base_model_path,
        "pooling": "mean",
        "labels": LABELS,
        "max_seq_length": 32,
    }
    assert label_map(adapter) == {"labels": LABELS, "id2label": {"0": "animal", "1": "fruit"}}


def test_the_reloaded_head_reproduces_the_evaluation(job: tuple[TrainingSpec, Recorder]) -> None:
    spec, events = job
    adapter = Path(events.of_type(CompletedMessage)[0].adapter_path)
    classifier = load_feature_extraction(adapter, spec.base_model_path)
    probabilities = classifier.predict_proba([row["text"] for row in VALID])
    labels = [LABELS.index(row["label"]) for row in VALID]
    evaluation = events.of_type(EvaluationMessage)[-1].metrics
    assert log_loss(labels, probabilities) == pytest.approx(evaluation["full_valid_loss"], abs=1e-6)
    predicted = classifier.predict([row["text"] for row in VALID])
    accuracy = np.mean([p == row["label"] for p, row in zip(predicted, VALID, strict=True)])
    assert accuracy == pytest.approx(evaluation["full_valid_accuracy"])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_head_probabilities_are_scikit_learns(n_classes: int) -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 5))
    head = LogisticRegression().fit(features, np.arange(30) % n_classes)
    probabilities = head_probabilities(features, head.coef_, head.intercept_)
    np.testing.assert_allclose(probabilities, head.predict_proba(features), rtol=0, atol=1e-12)


def test_without_a_validation_file_there_is_nothing_to_evaluate(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    spec = job_spec(
        tmp_path / "job",
        build_tiny_bert(tmp_path / "base"),
        "classification",
        LABELS,
        train,
        training_type="feature_extraction",
    )
    events = Recorder()
    run(spec, events)
    assert [type(m).__name__ for m in events.messages if not isinstance(m, LogMessage)] == [
        "StartedMessage",
        "MetricsMessage",
        "CompletedMessage",
    ]
    assert set(events.of_type(MetricsMessage)[0].metrics) == {"train_loss", "train_accuracy"}
