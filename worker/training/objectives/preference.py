"""Preference objectives on pairs of answers to one prompt: DPO on a causal LM, and reward modelling (a
scalar score head trained so the preferred answer scores higher).

Both see a pair as two rows, prompt + preferred answer and prompt + non-preferred answer, run in one
forward pass, and both take the loss -logsigmoid(r_chosen - r_rejected) of a reward per row: DPO's implicit
reward beta * (log π(answer) - log π_ref(answer)), or the reward model's score.

Full evaluation: loss, reward_accuracy (pairs whose preferred answer has the higher reward) and
reward_margin (mean r_chosen - r_rejected).
"""

import json
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from models.spec import Details, Metrics
from worker.training import distributed
from worker.training.data import IGNORE_INDEX, Example, collate, read_jsonl, template_message
from worker.training.loading import load_model
from worker.training.methods import untouched
from worker.training.objectives import BatchStats, Objective, register
from worker.training.objectives.causal_lm import trained_logits
from worker.training.tokens import pad_token_id, render_chat

REWARD_MODEL_FILE = "reward_model.json"


@dataclass(frozen=True)
class Pair:
    """One preference: two rows sharing the prompt, labelled on the answer tokens only."""

    chosen: Example
    rejected: Example
    split: str
    index: int
    """Position in its file's pairs: where DPO keeps the pair's reference log-probabilities."""

    @property
    def length(self) -> int:
        return max(self.chosen.length, self.rejected.length)

    @property
    def units(self) -> int:
        return 1

    @property
    def input_ids(self) -> list[int]:
        """A pair stands for its preferred row (where a merged export is verified)."""
        return self.chosen.input_ids


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, Any]
) -> tuple[list[int], list[int], list[int]]:
    """Prompt, preferred and non-preferred answer tokens. The prompt is the input rendered with the chat
    template and its generation prompt; an answer is what the template adds after that for the assistant
    turn (its end of turn included). They are tokenized apart, as at inference where the prompt is encoded
    alone and the model continues it."""
    inputs = record["input"]
    messages = [template_message(message) for message in inputs["messages"]]
    tools = inputs.get("tools")
    prompt = render_chat(tokenizer, messages, tools=tools, add_generation_prompt=True)
    answers = []
    for which in ("preferred", "non_preferred"):
        [message] = record.get(f"{which}_output") or record[f"{which}_completion"]
        text = render_chat(tokenizer, [*messages, template_message(message)], tools=tools)
        if not text.startswith(prompt):
            raise ValueError(
                "the chat template does not render the input with its generation prompt as a prefix of the "
                "input with an answer, so answer tokens cannot be located"
            )
        answers.append(tokenizer(text[len(prompt) :], add_special_tokens=False)["input_ids"])
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt_ids, answers[0], answers[1]


def make_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_seq_length: int, split: str, index: int
) -> tuple[Pair, bool]:
    """The pair's rows within max_seq_length, and whether they had to be cut. Both answers keep the same
    prompt, cut from the left (the generation prompt right before the answers stays); an answer is cut at
    its end only if it does not fit even after one prompt token (which predicts its first token)."""
    keep = min(len(prompt), max(max_seq_length - max(len(chosen), len(rejected)), 1))
    kept = prompt[len(prompt) - keep :]
    room = max_seq_length - keep

    def row(answer: list[int]) -> Example:
        return Example([*kept, *answer[:room]], [IGNORE_INDEX] * keep + answer[:room])

    truncated = keep < len(prompt) or max(len(chosen), len(rejected)) > room
    return Pair(row(chosen), row(rejected), split, index), truncated


def pair_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Bradley-Terry loss of per-pair rewards, summed, and the pairs whose preferred answer wins."""
    return -F.logsigmoid(chosen - rejected).sum(), int((chosen > rejected).sum())


class PairObjective(Objective[Pair]):
    """Loading, batching and evaluation shared by DPO and reward modelling; each gives the rewards."""

    accuracy = "reward_accuracy"

    @abstractmethod
    def rewards(self, model: nn.Module, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of the preferred and the non-preferred answers, one per pair."""

    def load_examples(self, path: str, split: str) -> Sequence[Pair]:
        pairs: list[Pair] = []
        truncated = 0
        for line_no, record in read_jsonl(path):
            try:
                tokens = tokenize_pair(self.tokenizer, record)
            except Exception as exc:
                raise ValueError(f"{Path(path).name} line {line_no}: {exc}") from exc
            pair, cut = make_pair(*tokens, self.hp.max_seq_length, split, len(pairs))
            pairs.append(pair)
            truncated += cut
        if truncated:
            self.events.log(
                f"{truncated} {split} pairs exceed max_seq_length={self.hp.max_seq_length} and were cut, "
                "their prompt from the left first",
                level="warn",
            )
        if split == "training":
            self.truncated = truncated
        return pairs

    def batch_stats(self, model: nn.Module, examples: Sequence[Pair]) -> BatchStats:
        loss_sum, correct = pair_loss(*self.rewards(model, examples))
        tokens = sum(pair.chosen.length + pair.rejected.length for pair in examples)
        return BatchStats(loss_sum, len(examples), correct, tokens)

    def evaluate(self, model: nn.Module, examples: Sequence[Pair]) -> tuple[Metrics, Details]:
        def score(pairs: Sequence[Pair]) -> tuple[torch.Tensor, ...]:
            return tuple(side.cpu() for side in self.rewards(model, pairs))

        batches = distributed.map_batches(model, score, examples, self.hp.batch_size)
        chosen, rejected = (torch.cat(side) for side in zip(*batches, strict=True))
        loss_sum, correct = pair_loss(chosen, rejected)
        metrics = {
            "loss": loss_sum.item() / len(examples),
            "reward_accuracy": correct / len(examples),
            "reward_margin": (chosen - rejected).mean().item(),
        }
        return metrics, {}

    def collate_rows(self, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
        """Preferred rows first, then non-preferred ones: one right-padded batch of 2 * len(pairs) rows."""
        rows = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
        batch = collate(rows, pad_token_id(self.tokenizer))
        return {name: tensor.to(self.device.device) for name, tensor in batch.items()}


def answer_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each row's labelled (answer) tokens."""
    logits, targets, rows = trained_logits(model, batch)
    token_log_probs = -F.cross_entropy(logits.float(), targets, reduction="none")
    return token_log_probs.new_zeros(len(batch["labels"])).index_add(0, rows, token_log_probs)


@register("dpo")
class DPO(PairObjective):
    """Direct Preference Optimisation (Rafailov et al., 2023) with the reference log-probabilities computed
    once, before training, so no second copy of the model is held."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.validation: Sequence[Pair] = ()
        self.reference: dict[str, torch.Tensor] = {}
        """Per split: the reference log-probabilities of each pair's answers, shape (pairs, 2)."""

    def load_model(self, **options: Any) -> PreTrainedModel:
        return load_model(self.spec.base_model_path, self.device, **options)

    def load_examples(self, path: str, split: str) -> Sequence[Pair]:
        pairs = super().load_examples(path, split)
        if split == "validation":
            self.validation = pairs  # their references are computed with the training pairs'
        return pairs

    def before_training(self, model: nn.Module, examples: Sequence[Pair]) -> None:
        """Reference log-probabilities of the training and validation pairs, from the untouched model (also
        when resuming: the recipe calls this before restoring the checkpoint's weights), the batches
        shared out among the ranks."""
        was_training = model.training
        model.eval()
        with torch.no_grad(), untouched(model) as base:
            for split, pairs in {"training": examples, "validation": self.validation}.items():
                if pairs:
                    batches = distributed.map_batches(
                        model, lambda batch: self.log_probs(base, batch).cpu(), pairs, self.hp.batch_size
                    )
                    self.reference[split] = torch.cat(batches, dim=1).T
        model.train(was_training)

    def log_probs(self, model: nn.Module, pairs: Sequence[Pair]) -> torch.Tensor:
        """Answer log-probabilities, shape (2, pairs): preferred, then non-preferred."""
        return answer_log_probs(model, self.collate_rows(pairs)).view(2, len(pairs))

    def rewards(self, model: nn.Module, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        reference = torch.stack([self.reference[pair.split][pair.index] for pair in pairs], dim=1)
        chosen, rejected = self.hp.beta * (self.log_probs(model, pairs) - reference.to(self.device.device))
        return chosen, rejected


@register("reward")
class RewardModel(PairObjective):
    """A scalar score head (num_labels=1) on the base, trained so preferred answers score higher; the
    score of a row is the head's output at its last non-padding token, as transformers pools it."""

    def load_model(self, **options: Any) -> PreTrainedModel:
        # A decoder pools at the last token that is not padding, so its config must know the pad token.
        return load_model(
            self.spec.base_model_path,
            self.device,
            AutoModelForSequenceClassification,
            num_labels=1,
            pad_token_id=self.tokenizer.pad_token_id,
            **options,
        )

    def rewards(self, model: nn.Module, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.collate_rows(pairs)
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        chosen, rejected = output.logits.float().view(2, len(pairs))
        return chosen, rejected

    def save_extras(self, directory: Path) -> None:
        """Mark the artifact as a reward model: its one output is a score, not a class. An adapter's base
        must be loaded the same way (`AutoModelForSequenceClassification` with these fields)."""
        marker = {
            "type": "reward_model",
            "head": "score",
            "num_labels": 1,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        (directory / REWARD_MODEL_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
