"""Objectives: what a job learns from which examples, and how it is scored.

The recipe (`worker/training/recipe.py`) owns the loop: batching, optimisation, checkpoints, stopping. An
objective owns everything that depends on the task: which head the base model gets, how a JSONL file
becomes examples, the loss of a batch, and the full evaluation. Each lives in its own module and registers
with `@register(...)`; `get_objective` imports it on first use.
"""

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.spec import Details, Metrics, TrainingSpec
from worker.training.device import DeviceConfig
from worker.training.events import EventWriter


class Example(Protocol):
    @property
    def length(self) -> int:
        """Tokens the example takes in a batch (for length grouping and padding)."""
        ...

    @property
    def units(self) -> int:
        """What its loss is averaged over: trained tokens, one example, one pair."""
        ...

    @property
    def input_ids(self) -> list[int]:
        """The row a merged export is verified on."""
        ...


E = TypeVar("E", bound=Example)
"""An objective's own kind of example."""


@dataclass
class BatchStats:
    """One forward pass over a batch."""

    loss_sum: torch.Tensor
    """Differentiable sum of the per-unit losses; the recipe divides by the units of the whole step."""
    units: int
    correct: float
    """Units predicted right: tokens (token accuracy), examples (accuracy), pairs (reward accuracy); for
    GRPO, the sum of each prompt's mean reward."""
    tokens: int
    """Real (non-padding) tokens the batch fed the model."""


class Objective(ABC, Generic[E]):
    accuracy: str = "mean_token_accuracy"
    """What `correct / units` is called in step metrics: train_{accuracy}, valid_{accuracy}."""
    truncated: int = 0
    """Training examples cut at max_seq_length, counted by `load_examples` (and warned about)."""

    def __init__(
        self,
        spec: TrainingSpec,
        tokenizer: PreTrainedTokenizerBase,
        device: DeviceConfig,
        events: EventWriter,
    ) -> None:
        self.spec, self.hp, self.tokenizer, self.device, self.events = (
            spec,
            spec.hyperparameters,
            tokenizer,
            device,
            events,
        )

    @abstractmethod
    def load_model(self, **options: Any) -> PreTrainedModel:
        """The base model with this objective's head; `options` are the method's `from_pretrained` extras."""

    @abstractmethod
    def load_examples(self, path: str, split: str) -> Sequence[E]:
        """A validated JSONL file as examples; `split` ("training" or "validation") names it in warnings.
        Training examples may be packed; validation examples never are."""

    @abstractmethod
    def batch_stats(self, model: nn.Module, examples: Sequence[E]) -> BatchStats:
        """Collate `examples` onto the device and run the model (with grad if the caller has it on)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, examples: Sequence[E]) -> tuple[Metrics, Details]:
        """A full evaluation, in eval mode without grad: metric names as in `models.objectives.EVAL_METRICS`
        (the recipe adds the `full_valid_` prefix), and details that are not one number."""

    def before_training(self, model: nn.Module, examples: Sequence[E]) -> None:  # noqa: B027
        """Work on the untouched model before the first step (DPO's reference log-probabilities)."""

    def save_extras(self, directory: Path) -> None:  # noqa: B027
        """Anything the artifact needs besides the method's weights and the tokenizer (a label map)."""


ObjectiveClass = type[Objective[Any]]
_REGISTRY: dict[str, ObjectiveClass] = {}
_MODULES = {
    "sft": "causal_lm",
    "pretrain": "causal_lm",
    "classification": "classification",
    "token_classification": "token_classification",
    "dpo": "preference",
    "reward": "preference",
    "grpo": "grpo",
}


C = TypeVar("C", bound=ObjectiveClass)


def register(*names: str) -> Callable[[C], C]:
    def decorator(cls: C) -> C:
        for name in names:
            if name in _REGISTRY:
                raise ValueError(f"objective {name!r} is registered twice")
            _REGISTRY[name] = cls
        return cls

    return decorator


def get_objective(name: str) -> ObjectiveClass:
    if name not in _REGISTRY and name in _MODULES:
        importlib.import_module(f"{__name__}.{_MODULES[name]}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}")
    return _REGISTRY[name]
