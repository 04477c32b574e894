"""The rest of OpenAI's chat API in the inference server: logprobs (chat and completions, streamed and not,
in the openai SDK's types), response_format by constrained decoding, frequency/presence penalties and
logit_bias (each row of a mixed batch with its own settings), and a 400 naming every parameter that is not
implemented or not known."""

import json
from pathlib import Path

import jsonschema_rs
import pytest
import torch
from fastapi.testclient import TestClient
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import PreTrainedTokenizerBase

from inference.constrained import token_bytes
from inference.engine import Engine, Stream
from models.inference import ChatCompletionRequest
from tests.inference.conftest import (
    MESSAGES,
    chat_body,
    fresh_llama,
    reference_answer,
    stream_chunks,
    target,
    training_prompt_ids,
)
from worker.training.loading import load_tokenizer

TOKENS = 24
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["ok", "colour", "count"],
    "additionalProperties": False,
}


def chat_request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": TOKENS, **fields}
    )


def post(client: TestClient, body: dict[str, object], path: str = "chat/completions") -> dict:
    response = client.post(f"/internal/{path}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def error_of(client: TestClient, body: dict[str, object], path: str = "chat/completions") -> dict:
    response = client.post(f"/internal/{path}", json=body)
    assert response.status_code == 400, response.text
    return response.json()["error"]


@pytest.fixture(scope="module")
def tokenizer(base_dir: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(str(base_dir))


def reference_adjusted(
    base_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    frequency: float,
    presence: float,
    bias: dict[int, float],
) -> str:
    """Greedy decoding of the base alone, without a cache, with OpenAI's definitions applied to each step's
    logits: bias added, frequency × count and presence × (count > 0) subtracted."""
    model = fresh_llama(base_dir)
    ids = training_prompt_ids(tokenizer, MESSAGES)
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(TOKENS):
            logits = model(input_ids=torch.tensor([ids + generated])).logits[0, -1].float()
            for token, value in bias.items():
                logits[token] += value
            counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=len(logits))
            logits -= frequency * counts + presence * (counts > 0).float()
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
    return tokenizer.decode(generated, skip_special_tokens=True)


def text_of(stream: Stream) -> str:
    return "".join(choice["delta"].get("content") or "" for chunk in stream for choice in chunk["choices"])


def test_penalties_and_bias_apply_to_their_row_only_in_a_mixed_batch(
    engine: Engine, base_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    t = target(base_dir)
    plain = reference_answer(
        fresh_llama(base_dir), tokenizer, training_prompt_ids(tokenizer, MESSAGES), TOKENS
    )
    first = plain[0][0]
    bias = {first: -100.0, plain[0][1]: 5.0}  # never the plain answer's first token; favour its second
    expected = reference_adjusted(base_dir, tokenizer, 1.5, 0.7, bias)
    assert expected != plain[1], "the settings must change the answer for the test to mean anything"
    engine.chat(t, chat_request(max_tokens=1))  # load the base first, so the requests below overlap

    adjusted = chat_request(stream=True, frequency_penalty=1.5, presence_penalty=0.7, logit_bias=bias)
    # Both streams are admitted before either is read: they share the batch's steps.
    streams = [engine.stream_chat(t, adjusted), engine.stream_chat(t, chat_request(stream=True))]
    assert [text_of(stream) for stream in streams] == [expected, plain[1]]


def test_logit_bias_names_tokens_of_the_vocabulary(client: TestClient, base_dir: Path) -> None:
    t = target(base_dir)
    assert error_of(client, chat_body(t, logit_bias={"100000": 1}))["param"] == "logit_bias"
    assert error_of(client, chat_body(t, logit_bias={"5": 101}))["param"] == "logit_bias.5"
    assert error_of(client, chat_body(t, frequency_penalty=2.5))["param"] == "frequency_penalty"
    # +100 on one token makes greedy decoding repeat it (it is not the end of sequence).
    answer = post(client, chat_body(t, temperature=0, max_tokens=4, logit_bias={"300": 100}))
    assert answer["usage"]["completion_tokens"] == 4
    assert answer["choices"][0]["message"]["content"] == load_tokenizer(str(base_dir)).decode([300] * 4)


def test_chat_logprobs_are_the_model_own_streamed_or_not(
    client: TestClient, base_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    t = target(base_dir)
    answer = post(client, chat_body(t, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3))
    choice = ChatCompletion.model_validate(answer).choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == 6 and choice.finish_reason == "length"
    # The greedy tokens, each as its own bytes (a token may hold part of a UTF-8 character) and text.
    prompt = training_prompt_ids(tokenizer, MESSAGES)
    greedy = reference_answer(fresh_llama(base_dir), tokenizer, prompt, 6)[0]
    assert [bytes(entry.bytes or []) for entry in content] == [token_bytes(tokenizer, i) for i in greedy]
    for entry in content:
        whole = bytes(entry.bytes or [])
        shown = whole.decode() if whole.isascii() else entry.token
        assert entry.token == shown
    for entry in content:  # greedy: the chosen token is the most likely one
        assert [top.token for top in entry.top_logprobs][0] == entry.token and len(entry.top_logprobs) == 3
        assert entry.logprob == entry.top_logprobs[0].logprob
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
    # The first token's log probability is the base model's own, computed apart.
    with torch.no_grad():
        logits = fresh_llama(base_dir)(input_ids=torch.tensor([prompt])).logits[0, -1]
    assert content[0].logprob == pytest.approx(float(logits.log_softmax(-1).max()), abs=1e-4)

    body = chat_body(t, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, stream=True)
    chunks = stream_chunks(client.post("/internal/chat/completions", json=body))
    streamed = []
    for chunk in chunks:
        for part in ChatCompletionChunk.model_validate(chunk).choices:
            if part.logprobs is not None and part.logprobs.content:
                streamed += part.logprobs.content
    assert streamed == content

    # Without top_logprobs each token lists no alternatives; without logprobs there are none.
    bare = post(client, chat_body(t, temperature=0, max_tokens=2, logprobs=True))
    assert [entry["top_logprobs"] for entry in bare["choices"][0]["logprobs"]["content"]] == [[], []]
    assert post(client, chat_body(t, max_tokens=2))["choices"][0]["logprobs"] is None
    assert error_of(client, chat_body(t, top_logprobs=2))["param"] == "top_logprobs"
    assert error_of(client, chat_body(t, logprobs=True, top_logprobs=21))["param"] == "top_logprobs"


def test_completion_logprobs_in_the_legacy_shape(client: TestClient, base_dir: Path) -> None:
    body = {
        "target": target(base_dir).model_dump(),
        "request": {
            "model": "m",
            "prompt": "The capital of",
            "max_tokens": 5,
            "temperature": 0,
            "logprobs": 2,
        },
    }
    answer = post(client, body, "completions")
    choice = Completion.model_validate(answer).choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) == 5
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(5)]
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert len(top) <= 2 and top[token] == value == max(top.values())

    body["request"]["stream"] = True  # type: ignore[index]
    chunks = stream_chunks(client.post("/internal/completions", json=body))
    tokens, offsets = [], []
    for chunk in chunks:  # as in OpenAI's streams, finish_reason is null until the end: not a Completion
        for part in chunk["choices"]:
            if part["logprobs"] is not None:
                tokens += part["logprobs"]["tokens"]
                offsets += part["logprobs"]["text_offset"]
    assert tokens == logprobs.tokens and offsets == logprobs.text_offset
    assert error_of(client, {**body, "request": {**body["request"], "logprobs": 6}}, "completions")  # type: ignore[dict-item]


def test_a_json_schema_answer_validates_beside_a_free_row_that_answers_as_alone(
    engine: Engine, base_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    t = target(base_dir)
    plain = reference_answer(
        fresh_llama(base_dir), tokenizer, training_prompt_ids(tokenizer, MESSAGES), TOKENS
    )
    engine.chat(t, chat_request(max_tokens=1))
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    # Greedy and sampled rows under the schema, and a free row, in one batch.
    streams = [
        engine.stream_chat(t, chat_request(stream=True, max_tokens=64, response_format=response_format)),
        engine.stream_chat(
            t,
            chat_request(
                stream=True, max_tokens=64, response_format=response_format, n=3, temperature=1.0, seed=3
            ),
        ),
        engine.stream_chat(t, chat_request(stream=True)),
    ]
    validator = jsonschema_rs.validator_for(SCHEMA)
    texts = [text_of(streams[0])]
    sampled: dict[int, str] = {}
    for chunk in streams[1]:
        for choice in chunk["choices"]:
            sampled[choice["index"]] = sampled.get(choice["index"], "") + (
                choice["delta"].get("content") or ""
            )
    assert text_of(streams[2]) == plain[1]
    for text in [*texts, *sampled.values()]:
        assert validator.is_valid(json.loads(text)), text


def test_json_object_answers_are_json_objects(client: TestClient, base_dir: Path) -> None:
    t = target(base_dir)
    greedy = post(
        client, chat_body(t, max_tokens=200, temperature=0, response_format={"type": "json_object"})
    )
    assert greedy["choices"][0]["message"]["content"] == "{}"  # the random model's likeliest object
    # Sampled, the random model wanders in strings: an answer that ends ("stop", not cut at max_tokens as
    # OpenAI cuts one) is a JSON object.
    body = chat_body(t, max_tokens=200, n=8, seed=1, temperature=1, response_format={"type": "json_object"})
    ended = [c["message"]["content"] for c in post(client, body)["choices"] if c["finish_reason"] == "stop"]
    objects = [json.loads(text) for text in ended]
    assert all(isinstance(o, dict) for o in objects) and any(objects), ended


def test_a_schema_that_cannot_be_followed_is_a_400_naming_response_format(
    client: TestClient, base_dir: Path
) -> None:
    t = target(base_dir)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no such type"}}}
    assert error_of(client, chat_body(t, response_format=bad))["param"] == "response_format"
    nameless = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    error = error_of(client, chat_body(t, response_format=nameless))
    assert error["param"] == "response_format" and "json_schema.name: Field required" in error["message"]
    assert error_of(client, chat_body(t, response_format={"type": "xml"}))["param"] == ("response_format")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tools"),
        ({"tool_choice": "none"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"store": True}, "store"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_unsupported_and_unknown_chat_parameters_are_400s_naming_them(
    client: TestClient, base_dir: Path, extra: dict[str, object], param: str
) -> None:
    error = error_of(client, chat_body(target(base_dir), **extra))
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if param == "frobnicate":
        assert error["message"] == "Unrecognized request argument supplied: frobnicate"


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"suffix": "x"}, "suffix"), ({"echo": True}, "echo"), ({"best_of": 2}, "best_of"), ({"x": 1}, "x")],
)
def test_unsupported_and_unknown_completion_parameters_are_400s_naming_them(
    client: TestClient, base_dir: Path, extra: dict[str, object], param: str
) -> None:
    body = {"target": target(base_dir).model_dump(), "request": {"model": "m", "prompt": "hi", **extra}}
    assert error_of(client, body, "completions")["param"] == param


def test_harmless_parameters_are_accepted(client: TestClient, base_dir: Path) -> None:
    harmless = {
        "user": "u-1",
        "metadata": {"team": "a"},
        "store": False,
        "service_tier": "auto",
        "safety_identifier": "s",
        "prompt_cache_key": "k",
        "tools": None,
        "response_format": {"type": "text"},
        "max_tokens": 2,
    }
    messages = [*MESSAGES[:-1], {"role": "user", "content": "hi", "name": "ann"}]
    assert post(client, {**chat_body(target(base_dir), **harmless), "messages": messages})
    completion = {"model": "m", "prompt": "hi", "max_tokens": 2, "echo": False, "best_of": 1, "user": "u"}
    assert post(client, {"target": target(base_dir).model_dump(), "request": completion}, "completions")


def test_a_prompt_method_generating_alone_follows_the_schema_with_logprobs(
    client: TestClient, base_dir: Path
) -> None:
    """Prompt methods generate through transformers' `generate`, not the batch: the same settings apply."""
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    body = chat_body(
        target(base_dir, "prompt_tuning", "prompt_tuning"),
        temperature=0,
        max_tokens=64,
        logprobs=True,
        logit_bias={"300": 50},
        response_format=response_format,
    )
    choice = ChatCompletion.model_validate(post(client, body)).choices[0]
    assert choice.finish_reason == "stop"
    assert jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(choice.message.content or ""))
    assert choice.logprobs and choice.logprobs.content
    assert b"".join(bytes(e.bytes or []) for e in choice.logprobs.content).decode() == choice.message.content
