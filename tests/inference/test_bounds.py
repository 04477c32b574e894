"""The work one request may ask for is bounded (finding 1 of the security review): each over-limit value is
a 400 naming its parameter, and stop strings are matched in time linear in the text."""

import random
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from inference.generation import StopScanner
from models.inference import (
    MAX_CHOICES,
    MAX_MESSAGES,
    MAX_PROMPT_CHARACTERS,
    MAX_PROMPT_TOKENS,
    MAX_PROMPTS,
    MAX_STOP_LENGTH,
)
from tests.inference.conftest import chat_body, target


def rejected(client: TestClient, path: str, body: dict[str, object]) -> str:
    """The param a 400 names."""
    response = client.post(f"/internal/{path}", json=body)
    assert response.status_code == 400, response.text
    param: str = response.json()["error"]["param"]
    return param


@pytest.mark.parametrize(
    ("path", "request_fields", "param"),
    [
        # The security review's reproductions: 300 prompts with n 16, and a 2 MB stop string.
        ("completions", {"prompt": ["hi"] * 300, "n": 16}, "prompt"),
        ("chat/completions", {"stop": ["z" * 2_000_000]}, "stop"),
        ("completions", {"prompt": ["hi"] * (MAX_PROMPTS + 1)}, "prompt"),
        ("completions", {"prompt": ["hi"] * (MAX_CHOICES // 4 + 1), "n": 4}, "prompt"),
        ("completions", {"prompt": "x" * (MAX_PROMPT_CHARACTERS + 1)}, "prompt"),
        ("chat/completions", {"n": 17}, "n"),
        ("chat/completions", {"stop": "z" * (MAX_STOP_LENGTH + 1)}, "stop"),
        ("chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)},
            "messages",
        ),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "x" * (MAX_PROMPT_CHARACTERS + 1)}]},
            "messages",
        ),
        ("classifications", {"input": ["hi"] * (MAX_PROMPTS + 1)}, "input"),
        ("classifications", {"input": "x" * (MAX_PROMPT_CHARACTERS + 1)}, "input"),
    ],
)
def test_over_limit_requests_are_400s_naming_the_parameter(
    client: TestClient, base_dir: Path, path: str, request_fields: dict[str, object], param: str
) -> None:
    t = target(base_dir)
    body = chat_body(t, max_tokens=8)
    assert isinstance(body["request"], dict)
    if path != "chat/completions":
        body["request"].pop("messages")
    body["request"].update(request_fields)
    assert rejected(client, path, body) == param


def test_at_the_limits_requests_are_served(client: TestClient, base_dir: Path) -> None:
    t = target(base_dir)
    body = chat_body(t, max_tokens=2, temperature=0, stop=["s" * MAX_STOP_LENGTH] * 4)
    assert client.post("/internal/chat/completions", json=body).status_code == 200
    request = {"model": t.model, "prompt": ["hi"] * (MAX_CHOICES // 4), "n": 4, "max_tokens": 1}
    answer = client.post("/internal/completions", json={"target": t.model_dump(), "request": request})
    assert answer.status_code == 200 and len(answer.json()["choices"]) == MAX_CHOICES


def test_prompt_tokens_are_bounded_exactly_once_tokenized(client: TestClient, base_dir: Path) -> None:
    # Under the character bound and each prompt within the context, but too many tokens together.
    prompt = "The quick brown fox jumps over the lazy dog. " * 30
    request = {"model": "m", "prompt": [prompt] * MAX_PROMPTS, "max_tokens": 1}
    assert len(prompt) * MAX_PROMPTS <= MAX_PROMPT_CHARACTERS
    response = client.post(
        "/internal/completions", json={"target": target(base_dir).model_dump(), "request": request}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert str(MAX_PROMPT_TOKENS) in response.json()["error"]["message"]


def naive(text: str, stops: list[str]) -> tuple[int | None, int]:
    """The first stop string's start and the held tail, by brute force."""
    cuts = [index for s in stops if (index := text.find(s)) >= 0]
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return (min(cuts) if cuts else None), held


def test_the_stop_scanner_agrees_with_brute_force_on_growing_texts() -> None:
    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        scanner, text = StopScanner(stops), ""
        while True:
            text += "".join(rng.choices("abc", k=rng.randint(1, 3)))
            cut, (expected_cut, expected_held) = scanner.feed(text), naive(text, stops)
            assert cut == expected_cut, (stops, text)
            if cut is not None:
                break
            assert scanner.held() == expected_held, (stops, text)
            if len(text) > 40:
                break


def test_stop_matching_is_linear_in_the_stop_string_length() -> None:
    # A stop string whose every prefix the text keeps ending with: the case that was quadratic per token.
    stop = "a" * (MAX_STOP_LENGTH * 400)
    scanner, text = StopScanner([stop]), ""
    for _ in range(2000):
        text += "a" * 10
        assert scanner.feed(text) is None
    assert scanner.held() == len(text)
