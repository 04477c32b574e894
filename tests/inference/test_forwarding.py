"""The API in front of a real inference server (`ftjobs up` starts both as processes): the openai client's
requests reach the model with the new chat parameters and their 400s come back as the client's errors, and
a client that hangs up on a non-streamed call takes its rows out of the inference server's batch."""

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.servers import cli, create_key, free_port, process

pytestmark = pytest.mark.e2e


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def health(url: str) -> dict[str, Any]:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return {}
    return response.json() if response.status_code == 200 else {}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[str, str, str]]:
    """(the API's /v1 URL, an API key, the inference server's /healthz URL) of a running `ftjobs up`."""
    tmp = tmp_path_factory.mktemp("up")
    env = {"FTJOBS_DATA_DIR": str(tmp / "data")}
    cli("models", "add", "tiny-llama", str(tiny_model_dir), env=env)
    port, inference_port = free_port(), free_port()
    up = ["up", "--port", str(port), "--inference-port", str(inference_port)]
    with process(up, env, tmp / "up.log", f"http://127.0.0.1:{port}/healthz"):
        inference_health = f"http://127.0.0.1:{inference_port}/healthz"
        wait_until(lambda: bool(health(inference_health)), 300, "the inference server")
        yield f"http://127.0.0.1:{port}/v1", create_key(env), inference_health


def test_the_openai_client_gets_logprobs_schema_answers_and_400s(served: tuple[str, str, str]) -> None:
    url, key, _ = served
    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=3)
    assert plain.choices[0].logprobs is None and plain.usage and plain.usage.completion_tokens == 3

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    answer = client.chat.completions.create(
        model="tiny-llama",
        messages=messages,
        max_tokens=32,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        frequency_penalty=0.5,
        logit_bias={"300": -100},
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    choice = answer.choices[0]
    assert isinstance(json.loads(choice.message.content or "")["ok"], bool)
    assert choice.logprobs and choice.logprobs.content and len(choice.logprobs.content[0].top_logprobs) == 2

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny-llama",
            messages=messages,
            tools=[{"type": "function", "function": {"name": "weather"}}],
            tool_choice="required",
        )
    assert refused.value.status_code == 400 and refused.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="tiny-llama", messages=messages, extra_body={"frobnicate": 1})
    assert unknown.value.param == "frobnicate"


def test_a_client_leaving_a_non_streamed_call_drops_its_rows_from_the_batch(
    served: tuple[str, str, str],
) -> None:
    url, key, inference_health = served
    before = health(inference_health)["abandoned_rows"]
    # 64 rows of up to 400 tokens: far more work than the wait below, were the rows to stay.
    body = json.dumps(
        {"model": "tiny-llama", "prompt": ["hi"] * 16, "n": 4, "max_tokens": 400, "temperature": 0}
    ).encode()
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(request)
        # The rows are in the inference server's batch; then this client hangs up without reading.
        wait_until(lambda: health(inference_health)["batch_rows"] == 64, 60, "the rows to join the batch")
    # The API sees its client leave and closes its upstream call; the inference server sees that and drops
    # the rows as abandoned (finished rows would not count) at its next step.
    wait_until(
        lambda: health(inference_health)["abandoned_rows"] >= before + 64, 30, "the rows to be dropped"
    )
    assert health(inference_health)["batch_rows"] == 0
