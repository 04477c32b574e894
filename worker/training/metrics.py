"""Evaluation metrics of the classifier objectives, computed by scikit-learn and seqeval rather than by hand.

Pure functions of labels and predictions: each returns the metrics a full evaluation reports (names as in
`models.objectives.EVAL_METRICS`) and the details that are not one number. A ratio with nothing to divide
by (precision of a class never predicted) is 0, never a warning.

Both libraries are untyped: their results are read through numpy (scalars or arrays by `average`), and
pyright infers `zero_division` as a string from its "warn" default.
"""

import numpy as np
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.metrics.sequence_labeling import precision_recall_fscore_support as entity_scores
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from models.spec import Details, Metrics

OUTSIDE = "O"
CHUNK_PREFIXES = ("B-", "I-", "E-", "S-")
"""Tags that seqeval reads as chunk positions (IOB2, and IOBES for files that use it)."""


def classification_report(y_true: list[int], y_pred: list[int], labels: list[str]) -> tuple[Metrics, Details]:
    """Accuracy and macro F1 over class ids (indices into `labels`), with per-class scores and the confusion
    matrix (rows: true class, columns: predicted, both in `labels` order).

    Macro F1 averages over the classes that occur in `y_true` or `y_pred`, as scikit-learn does: a class
    missing from a small validation file would otherwise count as an F1 of 0 that no model can improve.
    """
    ids = list(range(len(labels)))
    precision, recall, f1, support = map(
        np.asarray,
        precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0),  # pyright: ignore[reportArgumentType]
    )
    macro_f1 = f1_score(y_true, y_pred, average="macro", zero_division=0)  # pyright: ignore[reportArgumentType]
    metrics = {"accuracy": float(accuracy_score(y_true, y_pred)), "macro_f1": float(macro_f1)}
    details = {
        "labels": list(labels),
        "per_class": {
            label: _scores(precision[i], recall[i], f1[i], support[i]) for i, label in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }
    return metrics, details


def entity_report(true_tags: list[list[str]], pred_tags: list[list[str]]) -> tuple[Metrics, Details]:
    """Entity-level precision, recall and F1 (micro-averaged over entities, as CoNLL reports them), with
    the same scores per entity type.

    An entity counts only if its type and its exact span match. Spans are read as conlleval does (seqeval's
    default mode): `B-X` begins an entity, `I-X` continues one of type X and begins one after `O` or another
    type, `E-`/`S-` are read as IOBES. A tag without such a prefix (`PER` in an IO-tagged file) is an entity
    type of its own: a run of equal bare tags is one entity, as if each were `I-PER`.
    """
    true, pred = _chunk_tags(true_tags), _chunk_tags(pred_tags)
    precision, recall, f1, support = map(
        np.asarray,
        entity_scores(true, pred, average="micro", zero_division=0),  # pyright: ignore[reportArgumentType]
    )
    types = sorted({entity[0] for entity in [*get_entities(true), *get_entities(pred)]})
    per_type = [
        np.asarray(values)
        for values in entity_scores(true, pred, average=None, zero_division=0)  # pyright: ignore[reportArgumentType]
    ]
    metrics = {"entity_precision": float(precision), "entity_recall": float(recall), "entity_f1": float(f1)}
    details = {
        "entity_support": int(support),
        "per_entity_type": {
            entity_type: _scores(*(values[i] for values in per_type)) for i, entity_type in enumerate(types)
        },
    }
    return metrics, details


def _chunk_tags(sequences: list[list[str]]) -> list[list[str]]:
    return [
        [tag if tag == OUTSIDE or tag.startswith(CHUNK_PREFIXES) else f"I-{tag}" for tag in tags]
        for tags in sequences
    ]


def _scores(precision: float, recall: float, f1: float, support: int) -> dict[str, float]:
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(support)}
