"""Token classification (NER) on a tiny BERT and a tiny Llama: tags land on each word's first sub-token,
real training steps raise the entity F1, every training method trains exactly its parameters and the new
head, its artifact reloads, and the full evaluation scores words as they were tagged."""

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from models.objectives import EVAL_METRICS, TRAINING_TYPES
from models.spec import CompletedMessage, EvaluationMessage, StartedMessage, TrainingSpec
from tests.tiny_model import build_tiny_bert
from tests.training.classifier_jobs import (
    NER_TAGS,
    Trained,
    expected_trainable,
    files_of,
    job_spec,
    label_map,
    make_objective,
    reload,
    run_job,
    sentences,
    train_method,
    write_jsonl,
)
from worker.training.data import IGNORE_INDEX
from worker.training.device import describe, select_device
from worker.training.loading import load_tokenizer
from worker.training.metrics import entity_report
from worker.training.objectives.token_classification import (
    Example,
    TokenClassification,
    align_tags,
    tokenize_words,
)

METHODS = sorted(TRAINING_TYPES["token_classification"])
HEAD = {"bert": {"classifier.weight", "classifier.bias"}, "llama": {"score.weight", "score.bias"}}
"""A token-classification head has a bias on both bases."""
FULL_METRICS = {f"full_valid_{name}" for name in EVAL_METRICS["token_classification"]}
TAG_IDS = {tag: index for index, tag in enumerate(NER_TAGS)}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    return {"bert": build_tiny_bert(tmp_path_factory.mktemp("bert")), "llama": tiny_model_dir}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(root / "train.jsonl", sentences(32, seed=0)),
        "valid": write_jsonl(root / "valid.jsonl", sentences(16, seed=1)),
        "batch": write_jsonl(root / "batch.jsonl", sentences(8, seed=2)),
    }


def token_classification(spec: TrainingSpec) -> TokenClassification:
    objective = make_objective(spec)
    assert isinstance(objective, TokenClassification)
    return objective


def test_align_tags_labels_each_word_once_at_its_first_sub_token() -> None:
    # [CLS] w0 w0 w1 w1 w1 [SEP]; w2 produced no sub-token (an empty word, or one cut off).
    labels, starts = align_tags([None, 0, 0, 1, 1, 1, None], [3, 1, 2])
    assert labels == [IGNORE_INDEX, 3, IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert starts == [1, 3, None]


def test_sub_words_of_real_tokenizers_line_up_with_their_words(bases: dict[str, Path]) -> None:
    words, tags = ["the", "strawberry", "dog"], ["O", "B-FRU", "B-ANI"]
    bert = load_tokenizer(str(bases["bert"]))
    pieces = [bert.tokenize(word) for word in words]
    assert len(pieces[1]) > 1  # the tiny WordPiece splits "strawberry"
    example, truncated = tokenize_words(bert, words, tags, TAG_IDS, max_length=32)
    assert bert.convert_ids_to_tokens(example.input_ids) == ["[CLS]", *sum(pieces, []), "[SEP]"]
    starts = [1, 1 + len(pieces[0]), 1 + len(pieces[0]) + len(pieces[1])]
    assert example.word_starts == starts and not truncated
    assert example.labels == [
        TAG_IDS[tags[starts.index(i)]] if i in starts else IGNORE_INDEX for i in range(example.length)
    ]
    assert example.units == 3

    # Cut after the first piece of "strawberry": it keeps its tag there, "dog" has no position left.
    cut, truncated = tokenize_words(bert, words, tags, TAG_IDS, max_length=starts[1] + 2)
    assert truncated and cut.word_starts == [*starts[:2], None]

    llama = load_tokenizer(str(bases["llama"]))  # byte-level BPE without special tokens: word 0 starts at 0
    example, _ = tokenize_words(llama, words, tags, TAG_IDS, max_length=32)
    assert example.word_starts[0] == 0 and example.labels[0] == TAG_IDS["O"]
    assert [label for label in example.labels if label != IGNORE_INDEX] == [TAG_IDS[tag] for tag in tags]


def tagger_logits(
    objective: TokenClassification, model: nn.Module, examples: Sequence[Example]
) -> torch.Tensor:
    return objective.forward(model, examples)[0]


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
        root,
        bases[kind],
        "token_classification",
        NER_TAGS,
        data["batch"],
        training_type=method,
        learning_rate=1e-2,
    )
    return kind, train_method(spec, tagger_logits, root / "artifact")


def test_each_method_trains_exactly_its_parameters_and_the_new_head(trained: tuple[str, Trained]) -> None:
    kind, result = trained
    changed, added = expected_trainable(result, kind, HEAD[kind])
    assert result.changed_base == changed
    assert result.added == added
    assert {name for name, p in result.model.named_parameters() if p.requires_grad} == changed | added
    assert result.unchanged_trainable == set()


def test_each_artifact_reloads_into_the_trained_tagger(trained: tuple[str, Trained]) -> None:
    _, result = trained
    assert "labels.json" in files_of(result.artifact)
    assert label_map(result.artifact)["labels"] == NER_TAGS
    torch.testing.assert_close(result.logits(reload(result)), result.tuned_logits, rtol=0, atol=1e-5)
    assert (result.tuned_logits - result.base_logits).abs().max() > 1e-3


def test_the_full_evaluation_scores_each_word_at_its_first_sub_token(
    bases: dict[str, Path], data: dict[str, str], tmp_path: Path
) -> None:
    """The batched evaluation agrees with reading every example alone through the tokenizer's word ids."""
    objective = token_classification(
        job_spec(tmp_path, bases["bert"], "token_classification", NER_TAGS, data["batch"])
    )
    examples = objective.load_examples(data["valid"], "validation")
    torch.manual_seed(0)
    model = objective.load_model().eval()
    with torch.no_grad():
        metrics, details = objective.evaluate(model, examples)
        predicted = []
        for example in examples:
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0]
            predicted.append([NER_TAGS[int(logits[start].argmax())] for start in example.word_starts])
    expected, expected_details = entity_report([example.tags for example in examples], predicted)
    assert set(metrics) == {name.removeprefix("full_valid_") for name in FULL_METRICS}
    assert {name: metrics[name] for name in expected} == pytest.approx(expected)
    assert details == expected_details


@pytest.mark.parametrize(("kind", "method"), [("bert", "full"), ("llama", "lora")])
def test_the_recipe_trains_a_tagger(
    kind: str, method: str, bases: dict[str, Path], data: dict[str, str], tmp_path: Path
) -> None:
    spec = job_spec(
        tmp_path,
        bases[kind],
        "token_classification",
        NER_TAGS,
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
    assert all(set(e.metrics) == FULL_METRICS for e in [baseline, *evaluations])
    final = evaluations[-1]
    assert final.metrics["full_valid_accuracy"] > baseline.metrics["full_valid_accuracy"] + 0.2
    assert final.metrics["full_valid_entity_f1"] > baseline.metrics["full_valid_entity_f1"] + 0.2
    assert set(final.details["per_entity_type"]) <= {"ANI", "FRU"}
    (completed,) = events.of_type(CompletedMessage)
    assert label_map(Path(completed.adapter_path))["labels"] == NER_TAGS
