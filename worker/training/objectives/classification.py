"""Text classification: one label per text, predicted by a new classifier head on an encoder (BERT reads its
[CLS] position) or a decoder (Llama reads the last token).

The head has one output per label of the training file (`spec.labels`, sorted; the index is the class id),
and the label map travels with every artifact and checkpoint as `labels.json`. Full evaluation: loss,
accuracy and macro F1, with per-class scores and the confusion matrix as details.

The loaders and the label map here serve token classification too.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BatchEncoding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from models.spec import Details, Metrics, TrainingSpec
from worker.training import distributed
from worker.training.data import read_jsonl
from worker.training.device import DeviceConfig
from worker.training.loading import load_model
from worker.training.metrics import classification_report
from worker.training.objectives import BatchStats, Objective, register
from worker.training.tokens import pad_token_id

LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    label: int

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def units(self) -> int:
        return 1


def load_classifier(
    spec: TrainingSpec, device: DeviceConfig, pad_token_id: int, auto_class: Any, **options: Any
) -> PreTrainedModel:
    """The base with a new head of one output per label, named by the label map. A decoder's head finds
    each row's last token by the pad id, which base configs often leave unset."""
    return load_model(
        spec.base_model_path,
        device,
        auto_class=auto_class,
        num_labels=len(spec.labels),
        id2label=dict(enumerate(spec.labels)),
        label2id={label: index for index, label in enumerate(spec.labels)},
        pad_token_id=pad_token_id,
        **options,
    )


def write_label_map(labels: list[str], directory: Path) -> None:
    """`labels.json` beside the weights, so an artifact says which output means which label."""
    label_map = {"labels": labels, "id2label": {str(index): label for index, label in enumerate(labels)}}
    (directory / LABELS_FILE).write_text(json.dumps(label_map, indent=2) + "\n", encoding="utf-8")


def encode(
    tokenizer: PreTrainedTokenizerBase, text: str | list[str], max_seq_length: int, **options: Any
) -> tuple[BatchEncoding, bool]:
    """The tokenizer's encoding of `text` (with its special tokens) cut at max_seq_length, and whether it
    had to be cut."""
    encoding = tokenizer(text, **options)
    if len(encoding["input_ids"]) <= max_seq_length:
        return encoding, False
    return tokenizer(text, truncation=True, max_length=max_seq_length, **options), True


def is_causal(model: nn.Module) -> bool:
    """Whether the model attends only to earlier positions (a decoder), so its last position sees the whole
    input."""
    return any(getattr(module, "is_causal", False) for module in model.modules())


def pad(rows: Sequence[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded with `value` to the longest, and the attention mask of the real positions."""
    width = max(len(row) for row in rows)
    padded = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        padded[index, span], mask[index, span] = torch.tensor(row), 1
    return padded, mask


def log_truncated(objective: Objective[Any], count: int, split: str) -> None:
    if count:
        objective.events.log(
            f"{count} {split} examples exceed max_seq_length={objective.hp.max_seq_length} and were "
            "truncated at the end",
            level="warn",
        )


@register("classification")
class Classification(Objective[Example]):
    accuracy = "accuracy"
    pad_left = False
    """Decoders read their last position, so their rows are padded on the left to end in a real token (also
    when a prompt method feeds embeddings, where the pad id cannot be found); encoders read the first, so
    theirs are padded on the right. Rotary positions make left padding exact for decoders, except that the
    padding sits between a prompt method's learned prompt and the text (PEFT drops position ids there)."""

    def load_model(self, **options: Any) -> PreTrainedModel:
        model = load_classifier(
            self.spec,
            self.device,
            pad_token_id(self.tokenizer),
            AutoModelForSequenceClassification,
            **options,
        )
        self.pad_left = is_causal(model)
        return model

    def load_examples(self, path: str, split: str) -> Sequence[Example]:
        class_ids = {label: index for index, label in enumerate(self.spec.labels)}
        examples, truncated = [], 0
        for _, record in read_jsonl(path):
            encoding, cut = encode(self.tokenizer, record["text"], self.hp.max_seq_length)
            # Integer labels are listed as strings in spec.labels.
            examples.append(Example(encoding["input_ids"], class_ids[str(record["label"])]))
            truncated += cut
        log_truncated(self, truncated, split)
        if split == "training":
            self.truncated = truncated
        return examples

    def logits(self, model: nn.Module, examples: Sequence[Example]) -> torch.Tensor:
        input_ids, attention_mask = pad(
            [example.input_ids for example in examples], pad_token_id(self.tokenizer), left=self.pad_left
        )
        device = self.device.device
        output = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        )
        return output.logits.float()

    def scored(self, model: nn.Module, examples: Sequence[Example]) -> tuple[torch.Tensor, list[int]]:
        """Summed cross-entropy of the batch and its predicted class ids."""
        logits = self.logits(model, examples)
        labels = torch.tensor([example.label for example in examples], device=logits.device)
        return F.cross_entropy(logits, labels, reduction="sum"), logits.argmax(dim=-1).tolist()

    def batch_stats(self, model: nn.Module, examples: Sequence[Example]) -> BatchStats:
        loss_sum, predictions = self.scored(model, examples)
        correct = sum(p == example.label for p, example in zip(predictions, examples, strict=True))
        return BatchStats(loss_sum, len(examples), correct, sum(example.length for example in examples))

    def evaluate(self, model: nn.Module, examples: Sequence[Example]) -> tuple[Metrics, Details]:
        def score(batch: Sequence[Example]) -> tuple[float, list[int]]:
            loss_sum, predictions = self.scored(model, batch)
            return loss_sum.item(), predictions

        scores = distributed.map_batches(model, score, examples, self.hp.batch_size)
        loss_sum, predictions = sum(loss for loss, _ in scores), [p for _, batch in scores for p in batch]
        metrics, details = classification_report(
            [example.label for example in examples], predictions, self.spec.labels
        )
        return {"loss": loss_sum / len(examples), **metrics}, details

    def save_extras(self, directory: Path) -> None:
        write_label_map(self.spec.labels, directory)
