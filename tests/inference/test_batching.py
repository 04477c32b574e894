"""Continuous batching: requests for one base share its forward passes, each answering as if alone, and no
request (or organisation) can hold the others back."""

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from inference.app import create_app
from inference.engine import Engine, Stream
from inference.store import AdapterEntry, DedicatedEntry
from models.inference import MAX_CHOICES, ChatCompletionRequest, Target
from tests.inference.conftest import (
    MESSAGES,
    chat_body,
    fresh_llama,
    reference_answer,
    reference_peft,
    settings_for,
    target,
    training_prompt_ids,
)
from worker.training.loading import load_tokenizer

TOKENS = 40
"""Long enough answers that concurrent requests overlap in the batch."""
KEYS = ["lora-a", "lora-b", None, "lora-c"]


@pytest.fixture(scope="module")
def alone(base_dir: Path, artifacts_root: Path) -> dict[str | None, str]:
    """Each adapter's (and the base's) greedy answer to MESSAGES over TOKENS tokens, on a model of its own."""
    tokenizer = load_tokenizer(str(base_dir))
    prompt = training_prompt_ids(tokenizer, MESSAGES)
    answers = {}
    for key in KEYS:
        model = reference_peft(base_dir, artifacts_root / key) if key else fresh_llama(base_dir)
        answers[key] = reference_answer(model, tokenizer, prompt, TOKENS)[1]
    assert len(set(answers.values())) == len(KEYS)
    return answers


def chat_request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": TOKENS, **fields}
    )


def texts_of(stream: Stream) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    return texts


def warm(engine: Engine, base_dir: Path, keys: list[str | None]) -> None:
    """Load the adapters (and the spare slots after them) first, so the requests under test overlap."""
    for key in keys:
        engine.chat(target(base_dir, key), chat_request(max_tokens=1))
    engine.models.settle(60)


def test_adapters_and_the_base_interleaved_in_one_batch_each_answer_as_alone(
    engine: Engine, base_dir: Path, alone: dict[str | None, str]
) -> None:
    warm(engine, base_dir, KEYS)
    keys = KEYS * 3
    # Streams join the batch as they are opened and run together; plain requests from threads join too.
    streams = [engine.stream_chat(target(base_dir, key), chat_request(stream=True)) for key in keys]
    with ThreadPoolExecutor(4) as pool:
        plain = list(pool.map(lambda key: engine.chat(target(base_dir, key), chat_request()), keys))
    for key, stream, answer in zip(keys, streams, plain, strict=True):
        assert texts_of(stream) == {0: alone[key]}, key
        assert answer["choices"][0]["message"]["content"] == alone[key], key
    assert engine.batching.waiting == 0


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine: Engine, base_dir: Path) -> None:
    sampled = chat_request(temperature=1.0, top_p=0.9, n=3, seed=7, max_tokens=16)
    lora_b = target(base_dir, "lora-b")
    warm(engine, base_dir, ["lora-a", "lora-b"])
    by_itself = [choice["message"]["content"] for choice in engine.chat(lora_b, sampled)["choices"]]
    assert len(set(by_itself)) > 1

    # The same request among others: greedy ones and another seed's samples, on other adapters and the base.
    others = [
        engine.stream_chat(target(base_dir, key), chat_request(stream=True, **fields))
        for key, fields in [("lora-a", {}), (None, {"temperature": 1.0, "seed": 8, "n": 2}), ("lora-b", {})]
    ]
    in_batch = [choice["message"]["content"] for choice in engine.chat(lora_b, sampled)["choices"]]
    for stream in others:
        list(stream)
    assert in_batch == by_itself


def test_a_cancelled_stream_leaves_the_batch_and_the_others_finish_as_alone(
    engine: Engine, base_dir: Path, alone: dict[str | None, str]
) -> None:
    warm(engine, base_dir, KEYS)
    leaving = engine.stream_chat(target(base_dir, "lora-a"), chat_request(stream=True, max_tokens=400))
    staying = [engine.stream_chat(target(base_dir, key), chat_request(stream=True)) for key in KEYS]
    received = [next(leaving), next(leaving)]  # the opening chunk and the first text
    leaving.cancel()
    received += list(leaving)
    assert len(received) < 40  # not 400 tokens' worth
    for key, stream in zip(KEYS, staying, strict=True):
        assert texts_of(stream) == {0: alone[key]}, key


def test_an_adapter_evicted_while_its_request_runs_stays_until_that_request_ends(
    artifacts_root: Path, base_dir: Path, alone: dict[str | None, str]
) -> None:
    engine = Engine(settings_for(artifacts_root, cache=2))
    warm(engine, base_dir, ["lora-a"])
    running = engine.stream_chat(target(base_dir, "lora-a"), chat_request(stream=True, max_tokens=TOKENS))
    next(running)
    # Two more adapters: lora-a leaves the LRU while its request is still generating.
    for key in ["lora-b", "lora-c"]:
        assert (
            engine.chat(target(base_dir, key), chat_request())["choices"][0]["message"]["content"]
            == alone[key]
        )
    assert [key for _, key in engine.models.cache] == ["lora-b", "lora-c"]
    assert texts_of(running) == {0: alone["lora-a"]}
    engine.models.settle(60)
    # Once its request ended, lora-a's slot was released: the cached adapters and one spare remain.
    base = engine.models.bases[str(base_dir)]
    assert base.pending == [] and base.peft is not None
    names = {entry.name for entry in engine.models.cache.values() if isinstance(entry, AdapterEntry)}
    assert set(base.peft.peft_config) == names | {base.spare}
    answer = engine.chat(target(base_dir, "lora-a"), chat_request())
    assert answer["choices"][0]["message"]["content"] == alone["lora-a"]


def test_past_the_queue_bound_requests_get_429_with_retry_after(artifacts_root: Path, base_dir: Path) -> None:
    settings = settings_for(artifacts_root).model_copy(update={"inference_max_queue": 1})
    engine = Engine(settings)
    full = target(base_dir, "full", "full")
    engine.chat(full, chat_request(max_tokens=1))
    entry = engine.models.cache[(str(base_dir), "full")]
    assert isinstance(entry, DedicatedEntry)
    with TestClient(create_app(settings, engine)) as client, ThreadPoolExecutor(2) as pool:
        with entry.served.lock:  # the model is busy: the first request is taken in, the second waits
            first = pool.submit(engine.chat, full, chat_request(max_tokens=2))
            wait_until(lambda: full_batch_started(engine))
            second = pool.submit(engine.chat, full, chat_request(max_tokens=2))
            wait_until(lambda: engine.batching.waiting == 1)
            response = client.post("/internal/chat/completions", json=chat_body(full, max_tokens=2))
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert first.result(60)["usage"]["completion_tokens"] == 2
        assert second.result(60)["usage"]["completion_tokens"] == 2
    assert engine.batching.waiting == 0


def full_batch_started(engine: Engine) -> bool:
    return (
        any(batcher.running for batcher in engine.batching.batchers.values()) and not engine.batching.waiting
    )


def wait_until(condition: object, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def server(engine: Engine, artifacts_root: Path) -> Iterator[str]:
    """The inference app on a real socket, so that a client can walk away."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(settings_for(artifacts_root), engine), port=port, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    wait_until(lambda: running.started)
    yield f"http://127.0.0.1:{port}"
    running.should_exit = True
    thread.join(30)


def victim_seconds(url: str, t: Target) -> float:
    """Another organisation's 8-token chat: the best of five, in seconds."""
    body = {**chat_body(t, temperature=0, max_tokens=8), "organization": "org-victim"}
    times = []
    for _ in range(5):
        started = time.monotonic()
        assert httpx.post(f"{url}/internal/chat/completions", json=body, timeout=60).status_code == 200
        times.append(time.monotonic() - started)
    return min(times)


@pytest.mark.parametrize("stream", [False, True])
def test_an_abandoned_request_leaves_its_batch_and_a_victim_answers_as_fast_as_when_idle(
    engine: Engine, server: str, base_dir: Path, stream: bool
) -> None:
    t = target(base_dir)
    idle = victim_seconds(server, t)
    attack = {
        "target": t.model_dump(),
        "request": {
            "model": "m",
            "prompt": ["hi"] * (MAX_CHOICES // 4),
            "n": 4,
            "max_tokens": 400,
            "temperature": 0,  # greedy: no row of the random model may happen to draw its end early
            "stream": stream,
        },
        "organization": "org-attacker",
    }
    if stream:  # read for 3 s, then walk away
        started = time.monotonic()
        with httpx.stream("POST", f"{server}/internal/completions", json=attack, timeout=60) as response:
            assert response.status_code == 200
            for _ in response.iter_raw():
                if time.monotonic() - started > 3:
                    break
    else:  # the answer takes far longer: give up after 1 s
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server}/internal/completions", json=attack, timeout=1)
    # Within a second of the client leaving, its 64 rows are gone and nothing of it waits.
    wait_until(lambda: not engine.batching.batchers and not engine.batching.waiting, seconds=2)
    # 100 ms of slack for scheduling jitter on a busy 2-core machine (the rows' departure itself is asserted
    # just above; had they stayed, the victim would share every step with 64 rows of 400 tokens).
    assert victim_seconds(server, t) <= 2 * idle + 0.1


def test_an_organisation_with_no_row_in_a_full_batch_is_admitted_at_the_next_step(
    engine: Engine, base_dir: Path
) -> None:
    t = target(base_dir)
    flood = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 300, "n": 16, "stream": True}
    )
    # One organisation fills the batch (64 rows) and queues more behind it.
    floods = [engine.stream_chat(t, flood, "org-flood") for _ in range(6)]
    wait_until(lambda: engine.batching.waiting == 2)
    answer = engine.chat(t, chat_request(max_tokens=8), "org-victim")
    assert answer["usage"]["completion_tokens"] == 8
    # The victim came and went while the flood's later requests still wait for room.
    assert engine.batching.waiting == 2
    for stream in floods:
        stream.cancel()
        list(stream)
