"""Hyperparameters as a client sends them ("auto" allowed) and how "auto" is resolved at job start.

OpenAI's three (`n_epochs`, `batch_size`, `learning_rate_multiplier`) keep their documented ranges;
the method and optimisation extensions ride beside them in `method.supervised.hyperparameters`.
"""

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.objectives import BEST_METRIC, OPTION_OBJECTIVES, metric_name
from models.spec import METHODS, Objective, ResolvedHyperparameters, TrainingType

Auto = Literal["auto"]

# What "auto" means, in one place (documented in docs/api.md); the base learning rate is the method's, every
# other default is ResolvedHyperparameters'.
DEFAULT_EPOCHS = 3
MAX_AUTO_BATCH_SIZE = 8
AUTO_EVALUATIONS_PER_EPOCH = 4
"""Reinforcement jobs are short and their reward curve is the point: "auto" evaluates this often."""
APPLIES_TO: dict[str, frozenset[str]] = {
    knob: frozenset(name for name, method in METHODS.items() if knob in method.knobs)
    for knob in dict.fromkeys(knob for method in METHODS.values() for knob in method.knobs)
}
"""Each method-specific knob and the training types that accept it."""
RESOLVED = ResolvedHyperparameters.model_fields


def _extension(name: str, default: str | None = None) -> Any:
    """A request field for an extension: unset by default, described by the resolved field it sets, what
    it is limited to, and what it resolves to when unset."""
    limits = [f"training_type {', '.join(sorted(APPLIES_TO[name]))}"] if name in APPLIES_TO else []
    limits += [f"{', '.join(sorted(OPTION_OBJECTIVES[name]))} jobs"] if name in OPTION_OBJECTIVES else []
    only = f" ({' and '.join(limits)} only)" if limits else ""
    default = default or json.dumps(RESOLVED[name].default)
    about = " ".join(str(RESOLVED[name].description).split())
    return Field(None, description=f"Extension{only}: {about} Default: {default}.")


class SupervisedHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | Annotated[int, Field(strict=True, ge=1, le=50)] = Field(
        default="auto",
        description=f"{RESOLVED['n_epochs'].description} auto: {DEFAULT_EPOCHS}, more for small files and "
        "fewer for large ones (OpenAI's rule, docs/api.md).",
    )
    batch_size: Auto | Annotated[int, Field(strict=True, ge=1, le=256)] = Field(
        default="auto",
        description=f"{RESOLVED['batch_size'].description} auto: one per 50 training examples, 1 to "
        f"{MAX_AUTO_BATCH_SIZE}.",
    )
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = Field(
        default="auto",
        description=f"{RESOLVED['learning_rate_multiplier'].description} auto: found by a short "
        "learning-rate range test before the first step, or 1 for a job too short for one (docs/api.md).",
    )
    # Extensions.
    training_type: TrainingType = Field(
        default=RESOLVED["training_type"].default,
        description=f"Extension: {RESOLVED['training_type'].description} Default: "
        f"{RESOLVED['training_type'].default}.",
    )
    learning_rate: Annotated[float, Field(gt=0, le=1)] | None = _extension(
        "learning_rate", "the training type's base rate times learning_rate_multiplier"
    )
    lora_r: Annotated[int, Field(strict=True, ge=1, le=1024)] | None = _extension("lora_r")
    lora_alpha: Annotated[float, Field(gt=0, le=4096)] | None = _extension("lora_alpha")
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] | None = _extension("lora_dropout")
    lora_target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] | None = (
        _extension("lora_target_modules")
    )
    max_seq_length: Annotated[int, Field(strict=True, ge=16, le=131072)] | None = _extension("max_seq_length")
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] | None = _extension("warmup_ratio")
    trainable_layers: Annotated[int, Field(strict=True, ge=0, le=1000)] | None = _extension(
        "trainable_layers"
    )
    num_virtual_tokens: Annotated[int, Field(strict=True, ge=1, le=512)] | None = _extension(
        "num_virtual_tokens"
    )
    gradient_accumulation_steps: Annotated[int, Field(strict=True, ge=1, le=1024)] | None = _extension(
        "gradient_accumulation_steps"
    )
    weight_decay: Annotated[float, Field(ge=0, le=1)] | None = _extension("weight_decay")
    max_grad_norm: Annotated[float, Field(gt=0, le=1000)] | None = _extension("max_grad_norm")
    lr_scheduler: Literal["linear", "cosine", "constant"] | None = _extension("lr_scheduler")
    gradient_checkpointing: bool | None = _extension("gradient_checkpointing")
    packing: bool | None = _extension("packing", "true for pretrain jobs, false for sft jobs")
    group_by_length: bool | None = _extension("group_by_length")
    eval_steps: Annotated[int, Field(strict=True, ge=0)] | None = _extension("eval_steps")
    metric_for_best_checkpoint: Annotated[str, Field(min_length=1, max_length=64)] | None = _extension(
        "metric_for_best_checkpoint",
        ", ".join(f"{metric} for {objective}" for objective, metric in BEST_METRIC.items()),
    )
    early_stopping_patience: Annotated[int, Field(strict=True, ge=0, le=1000)] | None = _extension(
        "early_stopping_patience"
    )
    generation_eval_samples: Annotated[int, Field(strict=True, ge=0, le=1000)] | None = _extension(
        "generation_eval_samples"
    )

    def given(self) -> set[str]:
        """The fields a client set to a value (stored requests keep every field, unset ones as None)."""
        return {name for name in self.model_fields_set if getattr(self, name) is not None}


class DpoHyperparameters(SupervisedHyperparameters):
    """OpenAI's DPO hyperparameters (the supervised three and `beta`) with the same extensions."""

    beta: Auto | Annotated[float, Field(gt=0, le=2)] = Field(
        default="auto", description=f"{RESOLVED['beta'].description} auto: {RESOLVED['beta'].default}."
    )


class ReinforcementHyperparameters(DpoHyperparameters):
    """OpenAI's reinforcement hyperparameters with the same extensions; `beta` (the KL weight) and
    `max_completion_tokens` are extensions here."""

    compute_multiplier: Auto | Annotated[float, Field(gt=0.00001, le=10)] = Field(
        default="auto", description=f"{RESOLVED['compute_multiplier'].description} auto: 1."
    )
    eval_interval: Auto | Annotated[int, Field(strict=True, ge=1)] = Field(
        default="auto",
        description=f"{RESOLVED['eval_interval'].description} auto: about four evaluations per epoch.",
    )
    eval_samples: Auto | Annotated[int, Field(strict=True, ge=1, le=64)] = Field(
        default="auto", description=f"{RESOLVED['eval_samples'].description} auto: 1."
    )
    reasoning_effort: Literal["default", "low", "medium", "high"] = Field(
        default="default", description=str(RESOLVED["reasoning_effort"].description)
    )
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1, le=4096)] | None = _extension(
        "max_completion_tokens"
    )


HYPERPARAMETERS: dict[str, type[SupervisedHyperparameters]] = {
    "supervised": SupervisedHyperparameters,
    "dpo": DpoHyperparameters,
    "reinforcement": ReinforcementHyperparameters,
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
    """What a job trains with: the values the client gave, "auto" worked out, the defaults for the rest."""
    method = METHODS[requested.training_type]
    base = method.base_learning_rate
    auto = requested.learning_rate_multiplier == "auto" and requested.learning_rate is None
    multiplier = 1.0 if requested.learning_rate_multiplier == "auto" else requested.learning_rate_multiplier
    if requested.learning_rate is not None:
        # An explicit learning rate wins; the multiplier is shown relative to the base rate.
        learning_rate = requested.learning_rate
        multiplier = learning_rate / base
    else:
        learning_rate = base * multiplier
    given = {k: v for k, v in requested.model_dump(include=requested.given()).items() if v != "auto"}
    batch_size = auto_batch_size(n_examples) if requested.batch_size == "auto" else requested.batch_size
    if getattr(requested, "eval_interval", None) == "auto":
        given["eval_interval"] = max(1, math.ceil(n_examples / batch_size) // AUTO_EVALUATIONS_PER_EPOCH)
    return ResolvedHyperparameters(
        **{
            **given,
            "n_epochs": auto_epochs(n_examples) if requested.n_epochs == "auto" else requested.n_epochs,
            "batch_size": batch_size,
            "learning_rate_multiplier": multiplier,
            "learning_rate": learning_rate,
            # The trainer finds it (a solved classifier head takes no gradient steps to test).
            "learning_rate_search": auto and method.family != "features",
            # Raw text has no example boundaries worth padding; instruction data is packed on request.
            "packing": requested.packing if requested.packing is not None else objective == "pretrain",
            "metric_for_best_checkpoint": metric_name(
                requested.metric_for_best_checkpoint or BEST_METRIC[objective]
            ),
        }
    )


def echoed(method_type: str, requested: dict[str, Any], resolved: ResolvedHyperparameters) -> dict[str, Any]:
    """A started job's hyperparameters as its `method` shows them: the resolved values of the keys its
    method type takes and its training type accepts, and of objective-only options only where the client
    gave them (they were checked against the objective then). Sent back, they create the same job."""
    given = HYPERPARAMETERS[method_type].model_validate(requested).given()
    keys = {
        key
        for key in HYPERPARAMETERS[method_type].model_fields
        if resolved.training_type in APPLIES_TO.get(key, (resolved.training_type,))
        and (key not in OPTION_OBJECTIVES or key in given)
    }
    shown = resolved.model_dump(include=keys)
    if resolved.learning_rate_search:
        # Not found yet: "auto" until the range test reports (and sent back, asks for it again).
        shown["learning_rate_multiplier"] = "auto"
        shown.pop("learning_rate", None)
    return shown
