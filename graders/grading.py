"""Checking a grader (`check`, what validate does) and grading one sample with it (`grade`, what run and
later reinforcement fine-tuning do). A grader that cannot work is a GraderError naming its field; a sample
the grader fails on scores 0 with the reason in `Result.errors`, as OpenAI's run response reports it."""

import time
from dataclasses import dataclass, field
from typing import Any

from graders import formula, judging, sandbox, similarity, template
from graders.errors import GraderError
from graders.judging import Judge
from graders.shapes import (
    AnyGrader,
    LabelModelGrader,
    ModelGrader,
    MultiGrader,
    PythonGrader,
    SamplingParams,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
    sub_graders,
)


@dataclass
class Errors:
    """OpenAI's `metadata.errors` flags: all False is a clean run."""

    formula_parse_error: bool = False
    invalid_variable_error: bool = False
    model_grader_parse_error: bool = False
    model_grader_refusal_error: bool = False
    model_grader_server_error: bool = False
    model_grader_server_error_details: str | None = None
    other_error: bool = False
    python_grader_runtime_error: bool = False
    python_grader_runtime_error_details: str | None = None
    python_grader_server_error: bool = False
    python_grader_server_error_type: str | None = None
    sample_parse_error: bool = False
    truncated_observation_error: bool = False
    unresponsive_reward_error: bool = False


@dataclass
class Result:
    reward: float
    name: str
    type: str
    execution_time: float
    errors: Errors = field(default_factory=Errors)
    sub_rewards: dict[str, float] = field(default_factory=dict)
    token_usage: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per judge model: its prompt, completion and total tokens."""


def check(grader: AnyGrader, param: str = "grader") -> None:
    """GraderError (naming the field) when `grader` cannot be run here, whatever the sample."""
    if isinstance(grader, StringCheckGrader | TextSimilarityGrader):
        template.paths(grader.input, f"{param}.input")
        template.paths(grader.reference, f"{param}.reference")
    if isinstance(grader, TextSimilarityGrader):
        similarity.check(grader.evaluation_metric, f"{param}.evaluation_metric")
    elif isinstance(grader, PythonGrader):
        try:
            compile(grader.source, "grader.py", "exec")
        except (SyntaxError, ValueError) as error:
            raise GraderError(f"source does not compile: {error}", f"{param}.source") from error
        reason = sandbox.unavailable()
        if reason:
            raise GraderError(f"python graders cannot run here: {reason}.", f"{param}.type")
    elif isinstance(grader, ScoreModelGrader | LabelModelGrader):
        for i, message in enumerate(grader.input):
            for text in judging.texts(message.content):
                template.paths(text, f"{param}.input[{i}].content")
        if isinstance(grader, LabelModelGrader) and not set(grader.passing_labels) <= set(grader.labels):
            raise GraderError("passing_labels must be a subset of labels.", f"{param}.passing_labels")
        if isinstance(grader, ScoreModelGrader) and grader.range is not None:
            if len(grader.range) != 2 or grader.range[0] >= grader.range[1]:
                raise GraderError(
                    "range takes two numbers, the lowest score and a higher one.", f"{param}.range"
                )
    elif isinstance(grader, MultiGrader):
        graders = sub_graders(grader)
        for name, sub in graders.items():
            check(sub, f"{param}.graders.{name}")
        formula.check(grader.calculate_output, set(graders), f"{param}.calculate_output")


def model_graders(grader: AnyGrader, param: str = "grader") -> list[tuple[str, ModelGrader]]:
    """The grader's model graders (itself, or a multi grader's), each with its field."""
    if isinstance(grader, ScoreModelGrader | LabelModelGrader):
        return [(param, grader)]
    if isinstance(grader, MultiGrader):
        subs = sub_graders(grader).items()
        return [found for name, sub in subs for found in model_graders(sub, f"{param}.graders.{name}")]
    return []


def item_fields(grader: AnyGrader, param: str = "grader") -> dict[str, str]:
    """The item fields the grader's templates name (dotted paths after `item.`), each with the grader field
    that names it first; python graders read the item as they like, so name none."""
    templates: list[tuple[str, str]] = []
    if isinstance(grader, StringCheckGrader | TextSimilarityGrader):
        templates = [(grader.input, f"{param}.input"), (grader.reference, f"{param}.reference")]
    elif isinstance(grader, ScoreModelGrader | LabelModelGrader):
        templates = [
            (text, f"{param}.input[{i}].content")
            for i, message in enumerate(grader.input)
            for text in judging.texts(message.content)
        ]
    elif isinstance(grader, MultiGrader):
        found: dict[str, str] = {}
        for name, sub in sub_graders(grader).items():
            found = item_fields(sub, f"{param}.graders.{name}") | found
        return found
    fields: dict[str, str] = {}
    for text, where in templates:
        for path in template.paths(text, where):
            if path.startswith("item."):
                fields.setdefault(path.removeprefix("item."), where)
    return fields


def grade(
    grader: AnyGrader, model_sample: str, item: Any, judge: Judge | None = None, param: str = "grader"
) -> Result:
    """Score `model_sample` for `item`; model graders ask `judge` (without one, a GraderError). A template
    naming a field the item or sample lacks is a GraderError too."""
    started = time.monotonic()
    namespaces = {"item": item, "sample": template.sample_namespace(model_sample)}
    errors = Errors()
    sub_rewards: dict[str, float] = {}
    usage: dict[str, dict[str, int]] = {}
    if isinstance(grader, StringCheckGrader):
        reward = _string_check(grader, namespaces, param)
    elif isinstance(grader, TextSimilarityGrader):
        text = template.render(grader.input, namespaces, f"{param}.input")
        reference = template.render(grader.reference, namespaces, f"{param}.reference")
        reward = similarity.similarity(grader.evaluation_metric, text, reference)
    elif isinstance(grader, PythonGrader):
        outcome = sandbox.run(grader.source, namespaces["sample"], item)
        reward = outcome.score or 0.0
        errors.python_grader_runtime_error = outcome.error is not None
        errors.python_grader_runtime_error_details = outcome.error
    elif isinstance(grader, MultiGrader):
        for name, sub in sub_graders(grader).items():
            result = grade(sub, model_sample, item, judge, f"{param}.graders.{name}")
            sub_rewards[name] = result.reward
            _merge(errors, result.errors)
            for model, tokens in result.token_usage.items():
                usage[model] = {key: usage.get(model, {}).get(key, 0) + n for key, n in tokens.items()}
        try:
            reward = formula.evaluate(grader.calculate_output, sub_rewards)
        except (ValueError, ArithmeticError, TypeError):  # e.g. a division by zero for this sample
            reward, errors.formula_parse_error = 0.0, True
    else:
        if judge is None:
            raise GraderError(
                f"{grader.type} graders need a judge model, which is not served here.", f"{param}.type"
            )
        reply = judge(grader.model, judging.messages(grader, namespaces, param), _sampling(grader))
        usage[grader.model] = reply.usage
        score = None if reply.text is None else judging.reward(grader, reply.text)
        reward = score or 0.0
        errors.model_grader_server_error = reply.error is not None
        errors.model_grader_server_error_details = reply.error
        errors.model_grader_parse_error = reply.error is None and score is None
    elapsed = time.monotonic() - started
    return Result(reward, grader.name, grader.type, elapsed, errors, sub_rewards, usage)


def _sampling(grader: ScoreModelGrader | LabelModelGrader) -> SamplingParams | None:
    return grader.sampling_params if isinstance(grader, ScoreModelGrader) else None


def _string_check(grader: StringCheckGrader, namespaces: dict[str, Any], param: str) -> float:
    text = template.render(grader.input, namespaces, f"{param}.input")
    reference = template.render(grader.reference, namespaces, f"{param}.reference")
    if grader.operation == "eq":
        return float(text == reference)
    if grader.operation == "ne":
        return float(text != reference)
    if grader.operation == "like":
        return float(reference in text)
    return float(reference.lower() in text.lower())


def _merge(errors: Errors, more: Errors) -> None:
    for name, value in vars(more).items():
        if value and not getattr(errors, name):
            setattr(errors, name, value)
