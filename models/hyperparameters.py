"""Hyperparameters as a client sends them ("auto" allowed) and how "auto" is resolved at job start.

OpenAI's three (`n_epochs`, `batch_size`, `learning_rate_multiplier`) keep their documented ranges;
the method and optimisation extensions ride beside them in `method.supervised.hyperparameters`.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.objectives import BEST_METRIC, metric_name
from models.spec import METHODS, Objective, ResolvedHyperparameters, TrainingType

Auto = Literal["auto"]

# What "auto" means, in one place (documented in docs/api.md); the base learning rate is the method's.
DEFAULT_EPOCHS = 3
MAX_AUTO_BATCH_SIZE = 8
DEFAULTS = {
    "lora_r": 8,
    "lora_alpha": 16.0,
    "lora_dropout": 0.05,
    "lora_target_modules": "all-linear",
    "max_seq_length": 1024,
    "warmup_ratio": 0.05,
    "trainable_layers": 2,
    "num_virtual_tokens": 20,
    "gradient_accumulation_steps": 1,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "lr_scheduler": "linear",
    "gradient_checkpointing": False,
    "group_by_length": False,
    "eval_steps": 0,
    "early_stopping_patience": 0,
    "generation_eval_samples": 16,
}
APPLIES_TO: dict[str, frozenset[str]] = {
    knob: frozenset(name for name, method in METHODS.items() if knob in method.knobs)
    for knob in dict.fromkeys(knob for method in METHODS.values() for knob in method.knobs)
}
"""Each method-specific knob and the training types that accept it."""


class SupervisedHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | Annotated[int, Field(strict=True, ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(strict=True, ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = "auto"
    # Extensions.
    training_type: TrainingType = "lora"
    learning_rate: Annotated[float, Field(gt=0, le=1)] | None = None
    lora_r: Annotated[int, Field(strict=True, ge=1, le=1024)] | None = None
    lora_alpha: Annotated[float, Field(gt=0, le=4096)] | None = None
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    lora_target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] | None = None
    max_seq_length: Annotated[int, Field(strict=True, ge=16, le=131072)] | None = None
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] | None = None
    trainable_layers: Annotated[int, Field(strict=True, ge=0, le=1000)] | None = None
    num_virtual_tokens: Annotated[int, Field(strict=True, ge=1, le=512)] | None = None
    gradient_accumulation_steps: Annotated[int, Field(strict=True, ge=1, le=1024)] | None = None
    weight_decay: Annotated[float, Field(ge=0, le=1)] | None = None
    max_grad_norm: Annotated[float, Field(gt=0, le=1000)] | None = None
    lr_scheduler: Literal["linear", "cosine", "constant"] | None = None
    gradient_checkpointing: bool | None = None
    packing: bool | None = None
    group_by_length: bool | None = None
    eval_steps: Annotated[int, Field(strict=True, ge=0)] | None = None
    metric_for_best_checkpoint: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    early_stopping_patience: Annotated[int, Field(strict=True, ge=0, le=1000)] | None = None
    generation_eval_samples: Annotated[int, Field(strict=True, ge=0, le=1000)] | None = None

    def given(self) -> set[str]:
        """The fields a client set to a value (stored requests keep every field, unset ones as None)."""
        return {name for name in self.model_fields_set if getattr(self, name) is not None}


class DpoHyperparameters(SupervisedHyperparameters):
    """OpenAI's DPO hyperparameters (the supervised three and `beta`) with the same extensions."""

    beta: Auto | Annotated[float, Field(gt=0, le=2)] = "auto"


DEFAULT_BETA = 0.1
HYPERPARAMETERS: dict[str, type[SupervisedHyperparameters]] = {
    "supervised": SupervisedHyperparameters,
    "dpo": DpoHyperparameters,
    "reward_model": SupervisedHyperparameters,
}
"""The request shape of each method type's `hyperparameters`."""


def inapplicable_key(requested: SupervisedHyperparameters) -> str | None:
    """A given extension that means nothing for the chosen training_type (e.g. `lora_r` with `full`)."""
    for key, types in APPLIES_TO.items():
        if getattr(requested, key) is not None and requested.training_type not in types:
            return key
    return None


def auto_epochs(n_examples: int) -> int:
    """OpenAI's documented heuristic: 3 epochs, more for tiny sets, fewer for huge ones."""
    if n_examples * DEFAULT_EPOCHS < 100:
        return min(25, 100 // n_examples)
    if n_examples * DEFAULT_EPOCHS > 25000:
        return max(1, 25000 // n_examples)
    return DEFAULT_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    return max(1, min(MAX_AUTO_BATCH_SIZE, n_examples // 50))


def resolve(
    requested: SupervisedHyperparameters, n_examples: int, objective: Objective
) -> ResolvedHyperparameters:
    base = METHODS[requested.training_type].base_learning_rate
    multiplier = 1.0 if requested.learning_rate_multiplier == "auto" else requested.learning_rate_multiplier
    if requested.learning_rate is not None:
        # An explicit learning rate wins; the multiplier is shown relative to the base rate.
        learning_rate = requested.learning_rate
        multiplier = learning_rate / base
    else:
        learning_rate = base * multiplier
    extras = {
        k: getattr(requested, k) if getattr(requested, k) is not None else v for k, v in DEFAULTS.items()
    }
    beta = getattr(requested, "beta", "auto")
    return ResolvedHyperparameters(
        training_type=requested.training_type,
        # Raw text has no example boundaries worth padding; instruction data is packed on request.
        packing=requested.packing if requested.packing is not None else objective == "pretrain",
        metric_for_best_checkpoint=metric_name(
            requested.metric_for_best_checkpoint or BEST_METRIC[objective]
        ),
        beta=DEFAULT_BETA if beta == "auto" else beta,
        n_epochs=auto_epochs(n_examples) if requested.n_epochs == "auto" else requested.n_epochs,
        batch_size=auto_batch_size(n_examples) if requested.batch_size == "auto" else requested.batch_size,
        learning_rate_multiplier=multiplier,
        learning_rate=learning_rate,
        **extras,
    )
