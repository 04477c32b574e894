"""A job's files as its objective loads them for the pre-flight estimate: counts, truncation, and the
loss-mask preview of the first examples."""

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from models.objectives import GENERATIVE
from models.preflight import FileStats, PreviewExample, Segment
from models.spec import ChildMessage, DataError, LogMessage, TrainingSpec
from worker.training import data
from worker.training.data import IGNORE_INDEX, read_jsonl
from worker.training.device import device_config
from worker.training.events import EventWriter
from worker.training.objectives import Example, Objective, get_objective
from worker.training.objectives.preference import Pair

PREVIEW_EXAMPLES = 3
MAX_SEGMENT_CHARS = 2000
"""A longer segment of the preview keeps its first and last half of this and says how much it left out."""
DECODE_CONTEXT = 4
"""Tokens decoded ahead of a segment, so a tokenizer that treats the start of a decode specially
(SentencePiece drops a leading space) renders the segment as it reads in its row."""
PER_TOKEN: frozenset[str] = GENERATIVE | {"token_classification"}
"""Objectives whose loss is on tokens; classification and reward models score a whole row."""


class CollectedEvents(EventWriter):
    """An objective's warnings (truncation, dropped examples), kept here instead of sent to a runner."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def emit(self, message: ChildMessage) -> None:
        if isinstance(message, LogMessage) and message.level == "warn":
            self.warnings.append(message.message)


@dataclass(frozen=True)
class Loaded:
    """One file as an objective loads it."""

    rows: Sequence[Example]
    truncated: int
    warnings: list[str]


def unpacked(spec: TrainingSpec) -> TrainingSpec:
    hyperparameters = spec.hyperparameters.model_copy(update={"packing": False})
    return spec.model_copy(update={"hyperparameters": hyperparameters})


def load(spec: TrainingSpec, tokenizer: PreTrainedTokenizerBase, path: str, param: str) -> Loaded:
    """A file's rows as the job's objective loads its training file, and the examples it cut."""
    events = CollectedEvents()
    objective: Objective = get_objective(spec.objective)(spec, tokenizer, device_config("cpu"), events)
    try:
        rows = objective.load_examples(path, "training")
    except ValueError as error:  # e.g. a chat template that cannot locate the assistant turns
        raise DataError("invalid_example", f"The job would fail: {error}", param) from error
    return Loaded(rows, objective.truncated, events.warnings)


def rows_of(example: Example) -> list[Any]:
    """The token rows an example feeds the model: both answers of a preference pair."""
    return [example.chosen, example.rejected] if isinstance(example, Pair) else [example]


def file_stats(spec: TrainingSpec, file_id: str, n_examples: int, loaded: Loaded) -> FileStats:
    rows = [row for example in loaded.rows for row in rows_of(example)]
    return FileStats(
        id=file_id,
        n_examples=n_examples,
        n_rows=len(loaded.rows),
        n_tokens=sum(row.length for row in rows),
        n_trained_tokens=sum(row.units for row in rows) if spec.objective in PER_TOKEN else 0,
        n_truncated=loaded.truncated,
        max_example_tokens=max((row.length for row in rows), default=0),
    )


def preview(spec: TrainingSpec, tokenizer: PreTrainedTokenizerBase) -> list[PreviewExample]:
    """The first training examples, each loaded alone by the objective (unpacked), as text runs marked by
    whether the loss is taken on them."""
    examples = []
    with tempfile.TemporaryDirectory(prefix="ftjobs-preflight-") as directory:
        for index, (_, record) in zip(range(PREVIEW_EXAMPLES), read_jsonl(spec.training_file), strict=False):
            path = Path(directory) / f"{index}.jsonl"
            path.write_text(json.dumps(record) + "\n", encoding="utf-8")
            loaded = load(unpacked(spec), tokenizer, str(path), "training_file")
            rows = [row for example in loaded.rows for row in rows_of(example)]
            pairs = spec.data_format == "preference"
            label = getattr(loaded.rows[0], "label", None) if loaded.rows else None
            examples.append(
                PreviewExample(
                    n_tokens=sum(row.length for row in rows),
                    truncated=loaded.truncated > 0,
                    # One row: a pair's preferred one, a long text document's first chunk.
                    segments=segments(spec, tokenizer, rows[0]) if rows else [],
                    non_preferred_segments=segments(spec, tokenizer, rows[1]) if pairs and rows else None,
                    label=spec.labels[label] if label is not None else None,
                )
            )
    return examples


def trained_mask(spec: TrainingSpec, row: Any) -> list[bool]:
    """Which tokens of a row the loss is taken on: exactly those its `units` counts."""
    labels = getattr(row, "labels", None)
    if labels is None or spec.objective not in PER_TOKEN:
        return [False] * row.length
    mask = [label != IGNORE_INDEX for label in labels]
    if isinstance(row, data.Example):  # a language model never predicts a row's first token
        mask[0] = False
    return mask


def segments(spec: TrainingSpec, tokenizer: PreTrainedTokenizerBase, row: Any) -> list[Segment]:
    mask = trained_mask(spec, row)
    ids: list[int] = row.input_ids
    found = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            found.append(clipped(decode(tokenizer, ids, start, end), mask[start]))
            start = end
    return found


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int], start: int, end: int) -> str:
    """`ids[start:end]` as text, special tokens included."""
    context = max(0, start - DECODE_CONTEXT)
    before, through = tokenizer.decode(ids[context:start]), tokenizer.decode(ids[context:end])
    return through[len(before) :] if through.startswith(before) else tokenizer.decode(ids[start:end])


def clipped(text: str, trained: bool) -> Segment:
    if len(text) <= MAX_SEGMENT_CHARS:
        return Segment(text=text, trained=trained)
    half = MAX_SEGMENT_CHARS // 2
    omitted = len(text) - 2 * half
    return Segment(text=f"{text[:half]} … {text[-half:]}", trained=trained, omitted_chars=omitted)
