"""The classifier metrics on hand-made cases whose answers are worked out in the comments."""

import warnings

import pytest

from worker.training.metrics import classification_report, entity_report


def test_classification_report_per_class_scores_and_confusion_matrix() -> None:
    # a: 1 of 2 found, 1 of 2 predictions right → P=R=F1=0.5; b: 2 of 2 found, 2 of 3 predictions right →
    # P=2/3, R=1, F1=0.8; c: never predicted → 0 (not a warning); d: absent from both, not in macro F1.
    metrics, details = classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c", "d"])
    assert metrics == pytest.approx({"accuracy": 0.6, "macro_f1": (0.5 + 0.8 + 0.0) / 3})
    assert details["labels"] == ["a", "b", "c", "d"]
    assert details["per_class"] == {
        "a": pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}),
        "b": pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}),
        "c": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "d": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
    }
    # Rows are true classes, columns predictions, both in label order.
    assert details["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_entity_report_counts_only_exact_spans_of_the_right_type() -> None:
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-PER"]]
    # True entities PER(0-1), LOC(3), ORG(0), PER(2); predicted PER(0-1), ORG(3), ORG(0), PER(2): 3 of 4
    # are right both ways. LOC is never predicted; one of the two ORG predictions is right.
    metrics, details = entity_report(true, pred)
    assert metrics == pytest.approx({"entity_precision": 0.75, "entity_recall": 0.75, "entity_f1": 0.75})
    assert details["entity_support"] == 4
    assert details["per_entity_type"] == {
        "LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "ORG": pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}),
        "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2},
    }


@pytest.mark.parametrize(
    ("true", "pred", "f1"),
    [
        (["B-PER", "I-PER", "O"], ["B-PER", "O", "O"], 0.0),  # a span cut short is a miss and a false alarm
        (["B-PER", "I-PER", "O"], ["B-PER", "I-LOC", "O"], 0.0),  # I- of another type starts a new entity
        (["O", "B-PER", "I-PER"], ["O", "I-PER", "I-PER"], 1.0),  # conlleval: I- after O starts an entity
        (["B-PER", "B-PER"], ["B-PER", "I-PER"], 0.0),  # two one-word entities are not one of two words
        (["PER", "PER", "O", "LOC"], ["PER", "O", "O", "LOC"], 0.5),  # bare tags: a run is one entity
        (["PER", "PER", "O", "LOC"], ["I-PER", "I-PER", "O", "I-LOC"], 1.0),  # bare X reads as I-X
        (["O", "O"], ["O", "O"], 0.0),  # nothing to find: 0 by convention, without a warning
    ],
)
def test_entity_report_reads_spans_as_conlleval_does(true: list[str], pred: list[str], f1: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics, _ = entity_report([true], [pred])
    assert metrics["entity_f1"] == pytest.approx(f1)
