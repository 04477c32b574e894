"""Model graders (`score_model`, `label_model`): the judge's messages, rendered from the grader's templates
with an instruction saying how to answer, the chat completion the inference server is asked for, and the
reward read from the judge's reply. Who may ask is the caller's (`Judge`): the API for its organisation's
requests, a reinforcement job's trainer with its grant (models/judge_grants.py)."""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from graders import template
from graders.shapes import LabelModelGrader, ModelGrader, SamplingParams

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
JUDGE_MAX_TOKENS = 64
"""A judge's answer is a score or a label: unless the grader asks for more, it need not be long."""


@dataclass(frozen=True)
class Reply:
    """The judge's answer, or why there is none (`error`), and the tokens it took."""

    text: str | None
    usage: dict[str, int] = field(default_factory=dict)
    error: str | None = None


Judge = Callable[[str, list[dict[str, str]], SamplingParams | None], Reply]
"""(model, chat messages, sampling parameters) → the judge's reply."""


def request(model: str, messages: list[dict[str, str]], sampling: SamplingParams | None) -> dict[str, Any]:
    """The judge's chat completion request, in OpenAI's shape (the inference server validates it)."""
    given = sampling or SamplingParams()
    body = {
        "model": model,
        "messages": messages,
        "temperature": given.temperature,
        "top_p": given.top_p,
        "seed": given.seed,
        "max_completion_tokens": (
            JUDGE_MAX_TOKENS if given.max_completions_tokens is None else given.max_completions_tokens
        ),
    }
    return {key: value for key, value in body.items() if value is not None}


def ask(client: httpx.Client, target: dict[str, Any], organization: str, body: dict[str, Any]) -> Reply:
    """The judge's reply from the inference server `client` reaches: `target` is the judge model as the
    server loads it (models/inference.py's Target); an unreachable or failing server is the reply's error."""
    forwarded = {"target": target, "request": body, "organization": organization}
    try:
        response = client.post("/internal/chat/completions", json=forwarded)
    except httpx.TransportError as error:  # timeouts too
        return Reply(None, error=f"the inference server is not reachable ({type(error).__name__})")
    try:
        answer: dict[str, Any] = response.json()
    except ValueError:  # not the server's JSON: a proxy's error page, say
        answer = {}
    if response.status_code != 200:
        message = answer.get("error", {}).get("message", response.text[:300])
        return Reply(None, error=f"the judge model's server answered {response.status_code}: {message}")
    usage = {key: int(value) for key, value in (answer.get("usage") or {}).items() if isinstance(value, int)}
    return Reply(answer["choices"][0]["message"]["content"] or "", usage)


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
