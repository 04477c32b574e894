"""Token classification (NER): one tag per word of a pre-split text, predicted by a new per-token head on an
encoder (BERT) or a decoder (Llama).

The tokenizer splits words further into sub-tokens. A word's tag is trained and predicted at its first
sub-token; its other sub-tokens and the special tokens are ignored (-100), as Hugging Face's token
classification examples do, so every word counts once. Full evaluation: loss and accuracy over those
first sub-tokens, and entity precision, recall and F1 over the words' tags (`metrics.entity_report`). A word
left without a sub-token (cut off by max_seq_length, or dropped whole by the tokenizer) is predicted `O`.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForTokenClassification, PreTrainedModel, PreTrainedTokenizerBase

from models.spec import Details, Metrics
from worker.training import distributed
from worker.training.data import IGNORE_INDEX, read_jsonl
from worker.training.metrics import OUTSIDE, entity_report
from worker.training.objectives import BatchStats, Objective, register
from worker.training.objectives.classification import (
    encode,
    load_classifier,
    log_truncated,
    pad,
    write_label_map,
)
from worker.training.tokens import pad_token_id


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    """The tag id at each word's first sub-token, IGNORE_INDEX elsewhere."""
    word_starts: list[int | None]
    """Where each word's first sub-token is; None for a word without one."""
    tags: list[str]
    """The words' tags as the file gives them."""

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def units(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def align_tags(word_ids: list[int | None], tag_ids: list[int]) -> tuple[list[int], list[int | None]]:
    """Per-position labels (a word's tag at its first sub-token, IGNORE_INDEX elsewhere) and each word's
    first position, from the tokenizer's `word_ids()` (None for special tokens)."""
    labels = [IGNORE_INDEX] * len(word_ids)
    word_starts: list[int | None] = [None] * len(tag_ids)
    for position, word in enumerate(word_ids):
        if word is not None and word_starts[word] is None:
            word_starts[word], labels[position] = position, tag_ids[word]
    return labels, word_starts


def tokenize_words(
    tokenizer: PreTrainedTokenizerBase,
    words: list[str],
    tags: list[str],
    tag_ids: dict[str, int],
    max_length: int,
) -> tuple[Example, bool]:
    """An example of pre-split words (a fast tokenizer maps its sub-tokens back to them), and whether it had
    to be cut at max_length."""
    encoding, truncated = encode(tokenizer, words, max_length, is_split_into_words=True)
    labels, word_starts = align_tags(encoding.word_ids(), [tag_ids[tag] for tag in tags])
    return Example(encoding["input_ids"], labels, word_starts, tags), truncated


@register("token_classification")
class TokenClassification(Objective[Example]):
    accuracy = "accuracy"

    def load_model(self, **options: Any) -> PreTrainedModel:
        return load_classifier(
            self.spec, self.device, pad_token_id(self.tokenizer), AutoModelForTokenClassification, **options
        )

    def load_examples(self, path: str, split: str) -> Sequence[Example]:
        tag_ids = {tag: index for index, tag in enumerate(self.spec.labels)}
        examples, truncated = [], 0
        for _, record in read_jsonl(path):
            example, cut = tokenize_words(
                self.tokenizer, record["tokens"], record["tags"], tag_ids, self.hp.max_seq_length
            )
            examples.append(example)
            truncated += cut
        log_truncated(self, truncated, split)
        if split == "training":
            self.truncated = truncated
        return examples

    def forward(self, model: nn.Module, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position logits of the right-padded batch (padding never changes a real position's output:
        encoders mask it out, decoders only look back) and the labels."""
        input_ids, attention_mask = pad(
            [example.input_ids for example in examples], pad_token_id(self.tokenizer)
        )
        labels, _ = pad([example.labels for example in examples], IGNORE_INDEX)
        device = self.device.device
        output = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        )
        # Prompt tuning and p-tuning return outputs for their virtual tokens too, ahead of the input's.
        return output.logits[:, -input_ids.shape[1] :].float(), labels.to(device)

    def batch_stats(self, model: nn.Module, examples: Sequence[Example]) -> BatchStats:
        logits, labels = self.forward(model, examples)
        loss_sum, correct, units = tag_stats(logits, labels)
        return BatchStats(loss_sum, units, correct, sum(example.length for example in examples))

    def evaluate(self, model: nn.Module, examples: Sequence[Example]) -> tuple[Metrics, Details]:
        def score(batch: Sequence[Example]) -> tuple[float, int, int, list[list[str]]]:
            logits, labels = self.forward(model, batch)
            loss_sum, correct, units = tag_stats(logits, labels)
            predictions = logits.argmax(dim=-1).tolist()
            tags = [
                [OUTSIDE if p is None else self.spec.labels[row[p]] for p in example.word_starts]
                for row, example in zip(predictions, batch, strict=True)
            ]
            return loss_sum.item(), correct, units, tags

        scores = distributed.map_batches(model, score, examples, self.hp.batch_size)
        loss_sum = sum(loss for loss, *_ in scores)
        correct, units = sum(score[1] for score in scores), sum(score[2] for score in scores)
        predicted_tags = [tags for *_, batch in scores for tags in batch]
        metrics, details = entity_report([example.tags for example in examples], predicted_tags)
        return {"loss": loss_sum / units, "accuracy": correct / units, **metrics}, details

    def save_extras(self, directory: Path) -> None:
        write_label_map(self.spec.labels, directory)


def tag_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Summed cross-entropy, correct predictions and count over the tagged positions."""
    tagged = labels != IGNORE_INDEX
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    correct = int(((logits.argmax(dim=-1) == labels) & tagged).sum())
    return loss_sum, correct, int(tagged.sum())
