"""Model graders (`score_model`, `label_model`): the judge's messages, rendered from the grader's templates
with an instruction saying how to answer, and the reward read from the judge's reply. Calling the judge is
the caller's (`Judge`): the API calls the inference server, so this module stays free of any transport."""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from graders import template
from graders.shapes import LabelModelGrader, ModelGrader, SamplingParams

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Reply:
    """The judge's answer, or why there is none (`error`), and the tokens it took."""

    text: str | None
    usage: dict[str, int] = field(default_factory=dict)
    error: str | None = None


Judge = Callable[[str, list[dict[str, str]], SamplingParams | None], Reply]
"""(model, chat messages, sampling parameters) → the judge's reply."""


def messages(grader: ModelGrader, namespaces: dict[str, Any], param: str) -> list[dict[str, str]]:
    """The grader's messages with their templates filled in, then the answer format as a last user turn
    (no structured outputs here: the instruction and a lenient reader stand in for them)."""
    rendered = [
        {"role": message.role, "content": _render(message.content, namespaces, f"{param}.input[{i}].content")}
        for i, message in enumerate(grader.input)
    ]
    if isinstance(grader, LabelModelGrader):
        ask = f"Answer with exactly one of these labels: {', '.join(grader.labels)}."
    else:
        low, high = score_range(grader.range)
        ask = f'Answer with a score from {low:g} to {high:g} as JSON: {{"result": SCORE}}.'
    return [*rendered, {"role": "user", "content": ask}]


def reward(grader: ModelGrader, text: str) -> float | None:
    """The reward the judge's reply gives, or None when it holds no label or in-range score."""
    if isinstance(grader, LabelModelGrader):
        answer = _result(text).strip().strip("\"'.` ").lower()
        labels = {label.lower(): label for label in grader.labels}
        if answer not in labels:
            return None
        return float(labels[answer] in grader.passing_labels)
    low, high = score_range(grader.range)
    found = NUMBER.search(_result(text))
    score = float(found.group()) if found else None
    return score if score is not None and low <= score <= high else None


def score_range(bounds: list[float] | None) -> tuple[float, float]:
    return (bounds[0], bounds[1]) if bounds else (0.0, 1.0)


def texts(content: Any) -> list[str]:
    parts = content if isinstance(content, list) else [content]
    return [part if isinstance(part, str) else part.text for part in parts]


def _render(content: Any, namespaces: dict[str, Any], param: str) -> str:
    return "".join(template.render(text, namespaces, param) for text in texts(content))


def _result(text: str) -> str:
    """`{"result": X}`'s X when the reply is that JSON, else the reply itself."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    return str(parsed["result"]) if isinstance(parsed, dict) and "result" in parsed else text
