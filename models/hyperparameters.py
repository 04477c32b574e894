"""Hyperparameters as a client sends them ("auto" allowed) and how "auto" is resolved at job start.

OpenAI's three (`n_epochs`, `batch_size`, `learning_rate_multiplier`) keep their documented ranges;
the LoRA and optimisation extensions ride beside them in `method.supervised.hyperparameters`.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.spec import ResolvedHyperparameters

Auto = Literal["auto"]

# What "auto" means, in one place (documented in docs/hyperparameters.md).
BASE_LEARNING_RATE = 2e-4  # LoRA; learning_rate_multiplier scales it
DEFAULT_EPOCHS = 3
MAX_AUTO_BATCH_SIZE = 8
DEFAULTS = {
    "lora_r": 8,
    "lora_alpha": 16.0,
    "lora_dropout": 0.05,
    "lora_target_modules": "all-linear",
    "max_seq_length": 1024,
    "warmup_ratio": 0.05,
}


class SupervisedHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | Annotated[int, Field(strict=True, ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(strict=True, ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = "auto"
    # Extensions.
    learning_rate: Annotated[float, Field(gt=0, le=1)] | None = None
    lora_r: Annotated[int, Field(strict=True, ge=1, le=1024)] | None = None
    lora_alpha: Annotated[float, Field(gt=0, le=4096)] | None = None
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    lora_target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] | None = None
    max_seq_length: Annotated[int, Field(strict=True, ge=16, le=131072)] | None = None
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] | None = None


def auto_epochs(n_examples: int) -> int:
    """OpenAI's documented heuristic: 3 epochs, more for tiny sets, fewer for huge ones."""
    if n_examples * DEFAULT_EPOCHS < 100:
        return min(25, 100 // n_examples)
    if n_examples * DEFAULT_EPOCHS > 25000:
        return max(1, 25000 // n_examples)
    return DEFAULT_EPOCHS


def auto_batch_size(n_examples: int) -> int:
    return max(1, min(MAX_AUTO_BATCH_SIZE, n_examples // 50))


def resolve(requested: SupervisedHyperparameters, n_examples: int) -> ResolvedHyperparameters:
    multiplier = 1.0 if requested.learning_rate_multiplier == "auto" else requested.learning_rate_multiplier
    if requested.learning_rate is not None:
        # An explicit learning rate wins; the multiplier is shown relative to the base rate.
        learning_rate = requested.learning_rate
        multiplier = learning_rate / BASE_LEARNING_RATE
    else:
        learning_rate = BASE_LEARNING_RATE * multiplier
    extras = {
        k: getattr(requested, k) if getattr(requested, k) is not None else v for k, v in DEFAULTS.items()
    }
    return ResolvedHyperparameters(
        n_epochs=auto_epochs(n_examples) if requested.n_epochs == "auto" else requested.n_epochs,
        batch_size=auto_batch_size(n_examples) if requested.batch_size == "auto" else requested.batch_size,
        learning_rate_multiplier=multiplier,
        learning_rate=learning_rate,
        **extras,
    )
