"""Text classification on a tiny BERT (encoder) and a tiny Llama (decoder): real training steps raise the
accuracy on separable data; every training method changes exactly what it trains, a new head included, and
its artifact reloads into the trained classifier; the label map travels with every artifact."""

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from models.objectives import EVAL_METRICS, TRAINING_TYPES
from models.spec import (
    CheckpointMessage,
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
    Trained,
    expected_trainable,
    files_of,
    job_spec,
    label_map,
    make_objective,
    reload,
    run_job,
    texts,
    train_method,
    write_jsonl,
)
from worker.training.device import describe, select_device
from worker.training.objectives.classification import Classification, Example

LABELS = ["animal", "fruit"]
METHODS = sorted(TRAINING_TYPES["classification"] - {"feature_extraction"})
"""Every gradient-trained method a classification job may use (feature_extraction has its own tests)."""
FULL_METRICS = {f"full_valid_{name}" for name in EVAL_METRICS["classification"]}
HEAD = {"bert": {"classifier.weight", "classifier.bias"}, "llama": {"score.weight"}}
"""The new head's parameters: BERT's classifier has a bias, Llama's sequence-classification score none."""


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    return {"bert": build_tiny_bert(tmp_path_factory.mktemp("bert")), "llama": tiny_model_dir}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(root / "train.jsonl", texts(32, seed=0)),
        "valid": write_jsonl(root / "valid.jsonl", texts(16, seed=1)),
        "batch": write_jsonl(root / "batch.jsonl", texts(8, seed=2)),
    }


def classifier_logits(
    objective: Classification, model: nn.Module, examples: Sequence[Example]
) -> torch.Tensor:
    return objective.logits(model, examples)


@pytest.fixture(
    scope="module",
    params=[(kind, method) for kind in ("bert", "llama") for method in METHODS],
    ids=lambda param: "-".join(param),
)
def trained(
    request: pytest.FixtureRequest,
    bases: dict[str, Path],
    data: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, Trained]:
    kind, method = request.param
    root = tmp_path_factory.mktemp(f"{kind}-{method}")
    spec = job_spec(
        root, bases[kind], "classification", LABELS, data["batch"], training_type=method, learning_rate=1e-2
    )
    return kind, train_method(spec, classifier_logits, root / "artifact")


def test_each_method_trains_exactly_its_parameters_and_the_new_head(trained: tuple[str, Trained]) -> None:
    kind, result = trained
    changed, added = expected_trainable(result, kind, HEAD[kind])
    assert result.changed_base == changed
    assert result.added == added
    trainable = {name for name, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == (changed | added)
    assert result.unchanged_trainable == set()


def test_each_artifact_reloads_into_the_trained_classifier(trained: tuple[str, Trained]) -> None:
    _, result = trained
    assert "labels.json" in files_of(result.artifact)
    assert label_map(result.artifact) == {"labels": LABELS, "id2label": {"0": "animal", "1": "fruit"}}
    torch.testing.assert_close(result.logits(reload(result)), result.tuned_logits, rtol=0, atol=1e-5)
    assert (result.tuned_logits - result.base_logits).abs().max() > 1e-3


def classification(spec: TrainingSpec, events: Recorder | None = None) -> Classification:
    objective = make_objective(spec, events)
    assert isinstance(objective, Classification)
    return objective


def test_padding_changes_no_logits_encoders_pad_right_decoders_left(
    bases: dict[str, Path], data: dict[str, str], tmp_path: Path
) -> None:
    """Rows of a batch are padded to one length; a decoder must still read each at its last real token."""
    for kind, left in (("bert", False), ("llama", True)):
        objective = classification(job_spec(tmp_path, bases[kind], "classification", LABELS, data["batch"]))
        examples = objective.load_examples(data["batch"], "training")
        assert len({example.length for example in examples}) > 1
        model = objective.load_model().eval()
        assert objective.pad_left is left
        with torch.no_grad():
            batched = objective.logits(model, examples)
            one_by_one = torch.cat([objective.logits(model, [example]) for example in examples])
        torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-5)


def test_examples_map_integer_labels_and_count_truncation(bases: dict[str, Path], tmp_path: Path) -> None:
    rows = [{"text": "apple banana cherry grape lemon mango", "label": 10}, {"text": "a dog", "label": 2}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    events = Recorder()
    objective = classification(
        job_spec(tmp_path, bases["bert"], "classification", ["2", "10"], train, max_seq_length=6), events
    )
    examples = objective.load_examples(train, "training")
    assert [example.label for example in examples] == [1, 0]  # the runner sorts 2 before 10
    assert [len(example.input_ids) for example in examples] == [6, 4]
    assert examples[0].input_ids[-1] == objective.tokenizer.sep_token_id  # cut inside the text, [SEP] kept
    assert objective.truncated == 1
    assert [m.message for m in events.of_type(LogMessage)] == [
        "1 training examples exceed max_seq_length=6 and were truncated at the end"
    ]


@pytest.mark.parametrize(("kind", "method"), [("bert", "full"), ("llama", "lora")])
def test_the_recipe_trains_a_classifier_and_publishes_its_label_map(
    kind: str, method: str, bases: dict[str, Path], data: dict[str, str], tmp_path: Path
) -> None:
    spec = job_spec(
        tmp_path,
        bases[kind],
        "classification",
        LABELS,
        data["train"],
        data["valid"],
        training_type=method,
        n_epochs=3,
    )
    events = run_job(spec)

    device = describe(select_device())  # reported for the pre-flight estimate
    assert events.of_type(StartedMessage) == [
        StartedMessage(total_steps=12, n_train_examples=32, device=device)
    ]
    baseline, *evaluations = events.of_type(EvaluationMessage)
    assert baseline.baseline and [e.step for e in evaluations] == [4, 8, 12]
    assert all(set(e.metrics) == FULL_METRICS for e in [baseline, *evaluations])
    final = evaluations[-1]
    assert baseline.metrics["full_valid_accuracy"] <= 0.6
    assert final.metrics["full_valid_accuracy"] >= 0.85
    assert final.metrics["full_valid_loss"] < baseline.metrics["full_valid_loss"]
    assert final.details["labels"] == LABELS
    assert set(final.details["per_class"]) == set(LABELS)
    assert sum(map(sum, final.details["confusion_matrix"])) == 16
    last = events.of_type(MetricsMessage)[-1]
    assert {"train_loss", "train_accuracy", "valid_loss", "valid_accuracy"} <= set(last.metrics)

    (completed,) = events.of_type(CompletedMessage)
    checkpoints = [Path(c.path) for c in events.of_type(CheckpointMessage)]
    for directory in [Path(completed.adapter_path), *checkpoints]:
        assert label_map(directory)["labels"] == LABELS
    with open(completed.results_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["step"] for row in rows] == [str(step) for step in range(13)]
    assert float(rows[-1]["full_valid_accuracy"]) == pytest.approx(
        final.metrics["full_valid_accuracy"], abs=1e-5
    )
    if method == "lora":
        config = json.loads((Path(completed.adapter_path) / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS"
