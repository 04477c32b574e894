"""What a generation request controls (stop, n, seed, max_tokens, streaming, usage) and how prompts are
built (the chat template exactly as training renders it), checked against independently computed answers
and against the openai client's own response types."""

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import PreTrainedTokenizerFast

from api.errors import APIError
from inference.engine import Engine, chat_prompt_ids, text_prompts
from models.inference import ChatCompletionRequest, ChatMessage
from tests.inference.conftest import (
    MESSAGES,
    OTHER_TEMPLATE,
    chat_body,
    fresh_llama,
    reference_answer,
    reference_peft,
    stream_chunks,
    streamed_texts,
    target,
    training_prompt_ids,
)
from tests.tiny_model import build_tokenizer
from worker.training.data import tokenize_prompt_completion
from worker.training.loading import load_tokenizer


@pytest.fixture(scope="module")
def greedy(base_dir: Path, artifacts_root: Path) -> tuple[list[int], str, str]:
    """lora-a's greedy answer to MESSAGES over 24 tokens, on a model of its own."""
    tokenizer = load_tokenizer(str(base_dir))
    model = reference_peft(base_dir, artifacts_root / "lora-a")
    answer = reference_answer(model, tokenizer, training_prompt_ids(tokenizer, MESSAGES), 24)
    assert answer[2] == "length" and len(answer[1]) >= 8, "the tests below need a long answer"
    return answer


def post(client: TestClient, body: dict[str, object], path: str = "chat/completions") -> dict:
    response = client.post(f"/internal/{path}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_chat_prompt_is_the_prompt_training_scores_the_answer_after(base_dir: Path) -> None:
    tokenizer = load_tokenizer(str(base_dir))
    for messages in (MESSAGES, MESSAGES[1:2], [*MESSAGES[:1], {"role": "user", "content": ""}]):
        served = chat_prompt_ids(tokenizer, [ChatMessage.model_validate(m) for m in messages])
        assert served == training_prompt_ids(tokenizer, messages)
    # Content given as parts is the same text.
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is the "}, {"type": "text", "text": "sky?"}],
        }
    ]
    served = chat_prompt_ids(tokenizer, [ChatMessage.model_validate(m) for m in parts])
    assert served == training_prompt_ids(tokenizer, [{"role": "user", "content": "What is the sky?"}])


def test_an_empty_prompt_starts_from_bos_or_eos_and_without_either_is_a_400() -> None:
    tokenizer = build_tokenizer()  # eos, no bos
    assert text_prompts(["", "one"])(tokenizer) == [[tokenizer.eos_token_id], tokenizer("one")["input_ids"]]
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    assert bare.bos_token_id is None and bare.eos_token_id is None
    with pytest.raises(APIError) as refused:
        text_prompts([""])(bare)
    assert (refused.value.status_code, refused.value.param) == (400, "prompt")


def test_an_artifact_is_prompted_with_its_own_tokenizer_chat_template(
    client: TestClient, base_dir: Path, artifacts_root: Path
) -> None:
    own = load_tokenizer(str(artifacts_root / "lora-template"))
    assert own.chat_template == OTHER_TEMPLATE
    base = load_tokenizer(str(base_dir))
    expected, other = training_prompt_ids(own, MESSAGES), training_prompt_ids(base, MESSAGES)
    assert len(expected) != len(other)

    answer = post(client, chat_body(target(base_dir, "lora-template"), temperature=0, max_tokens=8))
    assert answer["usage"]["prompt_tokens"] == len(expected)
    model = reference_peft(base_dir, artifacts_root / "lora-template")
    _, text, finish = reference_answer(model, own, expected, 8)
    assert (answer["choices"][0]["message"]["content"], answer["choices"][0]["finish_reason"]) == (
        text,
        finish,
    )


def test_response_shape_usage_and_length_finish(
    client: TestClient, base_dir: Path, greedy: tuple[list[int], str, str]
) -> None:
    t = target(base_dir, "lora-a")
    answer = post(client, chat_body(t, temperature=0, max_tokens=5))
    ChatCompletion.model_validate(answer)
    assert answer["id"].startswith("chatcmpl-") and answer["object"] == "chat.completion"
    assert "system_fingerprint" not in answer  # the SDKs' types take it as absent, not as null
    assert answer["model"] == "ft:lora-a" and isinstance(answer["created"], int)
    prompt = training_prompt_ids(load_tokenizer(str(base_dir)), MESSAGES)
    assert answer["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": 5,
        "total_tokens": len(prompt) + 5,
    }
    choice = answer["choices"][0]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": choice["message"]["content"], "refusal": None},
        "logprobs": None,
        "finish_reason": "length",
    }
    tokenizer = load_tokenizer(str(base_dir))
    assert choice["message"]["content"] == tokenizer.decode(greedy[0][:5], skip_special_tokens=True)

    # max_completion_tokens wins over max_tokens, as in OpenAI's API.
    answer = post(client, chat_body(t, temperature=0, max_tokens=9, max_completion_tokens=3))
    assert answer["usage"]["completion_tokens"] == 3


def test_stop_cuts_before_the_stop_string_streamed_or_not(
    client: TestClient, base_dir: Path, greedy: tuple[list[int], str, str]
) -> None:
    text = greedy[1]
    stop = text[4:7]
    cut = text.index(stop)
    body = chat_body(target(base_dir, "lora-a"), temperature=0, max_tokens=24, stop=["no such text", stop])
    answer = post(client, body)
    assert answer["choices"][0]["message"]["content"] == text[:cut]
    assert answer["choices"][0]["finish_reason"] == "stop"

    body["request"]["stream"] = True  # type: ignore[index]
    chunks = stream_chunks(client.post("/internal/chat/completions", json=body))
    texts, finishes = streamed_texts(chunks)
    assert texts == {0: text[:cut]} and finishes == {0: "stop"}
    # Nothing past the cut was ever sent, not even a prefix of the stop string that later completed.
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text[:cut]


def test_stream_chunks_are_openai_chunks_with_n_choices_and_usage(
    client: TestClient, base_dir: Path, greedy: tuple[list[int], str, str]
) -> None:
    body = chat_body(
        target(base_dir, "lora-a"),
        temperature=0,
        max_tokens=6,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = stream_chunks(client.post("/internal/chat/completions", json=body))
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    for index in (0, 1):  # each choice opens with the role and ends with its finish reason
        own = [
            chunk["choices"][0]
            for chunk in chunks
            if chunk["choices"] and chunk["choices"][0]["index"] == index
        ]
        assert own[0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
        assert own[-1]["delta"] == {} and own[-1]["finish_reason"] == "length"
    texts, _ = streamed_texts(chunks)
    tokenizer = load_tokenizer(str(base_dir))
    assert texts == dict.fromkeys((0, 1), tokenizer.decode(greedy[0][:6], skip_special_tokens=True))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(chunk["usage"] is None for chunk in chunks[:-1])


def test_seeded_sampling_repeats_and_n_samples_differ(client: TestClient, base_dir: Path) -> None:
    t = target(base_dir, "lora-b")
    body = chat_body(t, temperature=1.0, top_p=0.9, n=3, seed=7, max_tokens=10)
    first, again = post(client, body), post(client, body)
    texts = [choice["message"]["content"] for choice in first["choices"]]
    assert [choice["index"] for choice in first["choices"]] == [0, 1, 2]
    assert texts == [choice["message"]["content"] for choice in again["choices"]]
    assert len(set(texts)) > 1  # three samples, not one answer thrice
    assert first["usage"]["prompt_tokens"] == again["usage"]["prompt_tokens"]  # counted once, not per choice
    body["request"]["seed"] = 8  # type: ignore[index]
    assert [choice["message"]["content"] for choice in post(client, body)["choices"]] != texts

    # Streaming samples the same tokens as the plain request.
    body["request"].update(seed=7, stream=True)  # type: ignore[union-attr]
    streamed, _ = streamed_texts(stream_chunks(client.post("/internal/chat/completions", json=body)))
    assert [streamed[i] for i in range(3)] == texts


def test_completions_take_a_list_of_prompts_and_answer_n_each(client: TestClient, base_dir: Path) -> None:
    prompts = ["The capital of France is", "Two plus two is"]
    t = target(base_dir)
    body = {
        "target": t.model_dump(),
        "request": {"model": t.model, "prompt": prompts, "n": 2, "temperature": 0, "max_tokens": 7},
    }
    answer = post(client, body, "completions")
    Completion.model_validate(answer)
    assert answer["id"].startswith("cmpl-") and answer["object"] == "text_completion"
    tokenizer, model = load_tokenizer(str(base_dir)), fresh_llama(base_dir)
    prompt_ids = [
        tokenize_prompt_completion(tokenizer, {"prompt": p, "completion": "x"}).prompt_ids for p in prompts
    ]
    expected = [reference_answer(model, tokenizer, ids, 7) for ids in prompt_ids]  # type: ignore[arg-type]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in answer["choices"]] == [
        (index, expected[index // 2][1], expected[index // 2][2]) for index in range(4)
    ]
    assert answer["usage"]["prompt_tokens"] == sum(len(ids) for ids in prompt_ids)  # type: ignore[arg-type]
    assert answer["usage"]["completion_tokens"] == 2 * sum(len(ids) for ids, _, _ in expected)

    body["request"]["stream"] = True  # type: ignore[index]
    chunks = stream_chunks(client.post("/internal/completions", json=body))
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    texts, finishes = streamed_texts(chunks)
    assert texts == {index: expected[index // 2][1] for index in range(4)}
    assert finishes == {index: expected[index // 2][2] for index in range(4)}


def test_requests_the_model_cannot_take_are_400s(client: TestClient, base_dir: Path) -> None:
    t = target(base_dir)
    long = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 60}]
    response = client.post(
        "/internal/chat/completions", json={**chat_body(t), "request": {"model": "m", "messages": long}}
    )
    assert response.status_code == 400
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (
        "messages",
        "context_length_exceeded",
    )

    response = client.post("/internal/chat/completions", json=chat_body(t, n=0))
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_max_tokens_never_runs_past_the_context(client: TestClient, base_dir: Path) -> None:
    t = target(base_dir)
    tokenizer = load_tokenizer(str(base_dir))
    words = "The quick brown fox jumps over the lazy dog. " * 25
    prompt_tokens = len(tokenizer(words)["input_ids"])
    room = 512 - prompt_tokens  # the tiny Llama's max_position_embeddings
    assert 0 < room < 256
    body = {
        "target": t.model_dump(),
        "request": {"model": "m", "prompt": words, "max_tokens": 1000, "temperature": 0},
    }
    answer = post(client, body, "completions")
    assert answer["usage"]["total_tokens"] <= 512
    model = fresh_llama(base_dir)
    ids, text, finish = reference_answer(model, tokenizer, tokenizer(words)["input_ids"], room)
    assert (answer["choices"][0]["text"], answer["choices"][0]["finish_reason"]) == (text, finish)
    assert torch.tensor(ids).numel() == answer["usage"]["completion_tokens"]


def test_a_cancelled_stream_stops_generating_and_frees_its_base(engine: Engine, base_dir: Path) -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 400, "stream": True}
    )
    stream = engine.stream_chat(target(base_dir, "lora-a"), request)
    stream.cancel()  # the client left right after the response started
    chunks = list(stream)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len(chunks) < 10  # not 400 tokens' worth
    engine.models.settle(60)  # the spare slot injected after lora-a's first use also holds the lock a while
    lock = engine.models.lock(str(base_dir))
    assert lock.acquire(blocking=False)
    lock.release()
