"""Which objective a job trains, which training types and options fit it, and the metrics it reports.

The objective follows from `method.type` and the training file's format (docs/api.md has the table). The
API checks a job against these rules at create time, so a combination that cannot train is a 400, never a
failed job; the runner applies the same rules again once the whole file has been validated.
"""

from dataclasses import dataclass

from models.spec import METHODS, DataFormat, Objective

OBJECTIVES: dict[tuple[str, str], Objective] = {
    ("supervised", "chat"): "sft",
    ("supervised", "prompt_completion"): "sft",
    ("supervised", "text"): "pretrain",
    ("supervised", "classification"): "classification",
    ("supervised", "token_classification"): "token_classification",
    ("dpo", "preference"): "dpo",
    ("reward_model", "preference"): "reward",
    ("reinforcement", "prompts"): "grpo",
}
GENERATIVE: frozenset[Objective] = frozenset({"sft", "pretrain", "dpo", "grpo"})
"""Objectives that need a base with a language-model head; the others put a classifier or scorer on it."""

EVAL_METRICS: dict[Objective, tuple[str, ...]] = {
    "sft": ("loss", "mean_token_accuracy", "perplexity", "exact_match"),
    "pretrain": ("loss", "mean_token_accuracy", "perplexity"),
    "classification": ("loss", "accuracy", "macro_f1"),
    "token_classification": ("loss", "accuracy", "entity_precision", "entity_recall", "entity_f1"),
    "dpo": ("loss", "reward_accuracy", "reward_margin"),
    "reward": ("loss", "reward_accuracy", "reward_margin"),
    "grpo": ("mean_reward",),
}
"""What a full evaluation reports, as `full_valid_{name}` (the baseline and every checkpoint)."""
BEST_METRIC: dict[Objective, str] = {
    "sft": "full_valid_loss",
    "pretrain": "full_valid_loss",
    "classification": "full_valid_macro_f1",
    "token_classification": "full_valid_entity_f1",
    "dpo": "full_valid_loss",
    "reward": "full_valid_reward_accuracy",
    "grpo": "full_valid_mean_reward",
}

TRAINING_TYPES: dict[Objective, frozenset[str]] = {
    objective: frozenset(name for name, method in METHODS.items() if objective in method.objectives)
    for objective in EVAL_METRICS
}
OPTION_OBJECTIVES: dict[str, frozenset[Objective]] = {
    "packing": frozenset({"sft", "pretrain"}),
    "generation_eval_samples": frozenset({"sft"}),
}
"""Extensions that mean something only for some objectives."""


@dataclass(frozen=True)
class Mismatch:
    """Why a job's parts do not fit together, and the request field to blame."""

    message: str
    param: str


def objective_for(method_type: str, data_format: DataFormat) -> Objective | Mismatch:
    if (objective := OBJECTIVES.get((method_type, data_format))) is not None:
        return objective
    fits = sorted(t for t, f in OBJECTIVES if f == data_format)
    return Mismatch(
        f"A {method_type} job cannot train on a file in {data_format} format; "
        f"that format is for method.type {' or '.join(repr(t) for t in fits)}.",
        "method.type",
    )


def metric_name(metric: str) -> str:
    """The full name of a metric given as `macro_f1` or `full_valid_macro_f1`."""
    return metric if metric.startswith("full_valid_") else f"full_valid_{metric}"


def check(
    objective: Objective,
    *,
    training_type: str,
    generative_base: bool | None,
    given: set[str],
    metric: str | None,
    where: str,
) -> Mismatch | None:
    """The first rule a job breaks: its training type, its base model, an option given for another
    objective, or a best-checkpoint metric this objective does not report. `where` prefixes the param."""
    if training_type not in TRAINING_TYPES[objective]:
        return Mismatch(
            f"training_type {training_type!r} cannot train a {objective} job; use one of "
            f"{', '.join(sorted(TRAINING_TYPES[objective]))}.",
            f"{where}.training_type",
        )
    if generative_base is False and objective in GENERATIVE:
        return Mismatch(
            f"A {objective} job needs a base model with a language-model head; this model is an encoder "
            "(it can train classification and token_classification jobs).",
            "model",
        )
    for option, objectives in OPTION_OBJECTIVES.items():
        if option in given and objective not in objectives:
            return Mismatch(
                f"`{option}` does not apply to {objective} jobs (only to {', '.join(sorted(objectives))}).",
                f"{where}.{option}",
            )
    if metric is not None and metric_name(metric).removeprefix("full_valid_") not in EVAL_METRICS[objective]:
        names = ", ".join(f"full_valid_{name}" for name in EVAL_METRICS[objective])
        return Mismatch(
            f"{objective} jobs do not report {metric!r}; choose one of {names}.",
            f"{where}.metric_for_best_checkpoint",
        )
    return None
