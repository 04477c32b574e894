"""Bounded memory and CPU per request (docs/security.md, the security review's finding 4), on the apps
in-process and on a real `ftjobs up` (API, embedded worker and inference server in processes of their own,
measured from outside): JSON bodies have a small limit of their own, answered 413 before they are read,
while uploads keep the large one; a pre-flight whose client leaves is stopped, in the API and in the
inference server."""

import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from inference.app import create_app as create_inference_app
from models.settings import Settings
from tests.conftest import RecordingDispatcher, Tenant
from tests.e2e.servers import cli, create_key, free_port, process
from tests.jobs_helpers import wait_for, write_chat
from tests.test_preflight import pathological_lines, preflight_children

CHAT_BOMB = (
    '{"model":"tiny","max_tokens":1,"messages":['
    + ",".join(['{"role":"user","content":""}'] * 700_000)
    + "]}"
).encode()
"""The review's 20 MB chat body: 700,000 empty messages (+0.9 GB in the API and +2.9 GB in the inference
server when they were parsed)."""
JSON = {"content-type": "application/json"}


def assert_413(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"] == f"Request body is larger than this route's limit of {limit} bytes."


def chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
    """The body without a Content-Length: the limit applies while it streams in."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the database is not what varies
def test_json_bodies_have_their_own_limit_and_uploads_keep_theirs(
    settings: Settings, dispatcher: RecordingDispatcher, tenant: Tenant
) -> None:
    small = settings.model_copy(update={"max_json_bytes": 2000, "max_upload_bytes": 100_000})
    chat = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 3000}]}).encode()
    with TestClient(create_app(small, dispatcher), headers=tenant.headers) as client:
        assert_413(client.post("/v1/chat/completions", content=chat, headers=JSON), 2000)
        assert_413(client.post("/v1/fine_tuning/jobs", content=chunks(chat), headers=JSON), 2000)
        lines = b"".join(
            json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}).encode() + b"\n"
            for i in range(2000)
        )
        assert 2000 < len(lines) < 100_000
        files = {"file": ("train.jsonl", io.BytesIO(lines))}
        uploaded = client.post("/v1/files", files=files, data={"purpose": "fine-tune"})
        assert uploaded.status_code == 200 and uploaded.json()["bytes"] == len(lines), uploaded.text
        files = {"file": ("train.jsonl", io.BytesIO(lines * 2))}
        assert_413(client.post("/v1/files", files=files, data={"purpose": "fine-tune"}), 100_000)
    # The inference server, which the API forwards to, has the API's limit and room for the forwarding.
    with TestClient(create_inference_app(small)) as inference:
        assert_413(
            inference.post("/internal/chat/completions", content=b"{" + b" " * 70_000 + b"}"), 2000 + 65_536
        )


@dataclass(frozen=True)
class Up:
    base_url: str
    key: str
    process: psutil.Process
    """`ftjobs up`: the API and the embedded worker."""
    inference: psutil.Process
    inference_url: str
    log: Path


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Up]:
    tmp = tmp_path_factory.mktemp("bounded")
    env = {"FTJOBS_DATA_DIR": str(tmp / "data"), "FTJOBS_ADMIN_KEY": "sk-ftjadmin-bounded-test-admin-key"}
    cli("models", "add", "tiny", str(tiny_model_dir), env=env)
    port, inference_port = free_port(), free_port()
    command = ["up", "--port", str(port), "--inference-port", str(inference_port)]
    with process(command, env, tmp / "up.log", f"http://127.0.0.1:{port}/healthz") as proc:
        inference_url = f"http://127.0.0.1:{inference_port}"

        def inference_up() -> bool:
            try:
                return httpx.get(f"{inference_url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(inference_up, 120, "the inference server")
        main = psutil.Process(proc.pid)
        [inference] = [child for child in main.children() if "serve" in child.cmdline()]
        yield Up(
            f"http://127.0.0.1:{port}/v1", create_key(env), main, inference, inference_url, tmp / "up.log"
        )


def test_a_20_mb_chat_body_is_413_before_either_process_reads_it(up: Up) -> None:
    headers = {"Authorization": f"Bearer {up.key}", **JSON}
    for url, server, limit in [
        (f"{up.base_url}/chat/completions", up.process, 4 * 2**20),
        (f"{up.inference_url}/internal/chat/completions", up.inference, 4 * 2**20 + 65_536),
    ]:
        before, started = server.memory_info().rss, time.monotonic()
        assert_413(httpx.post(url, content=CHAT_BOMB, headers=headers, timeout=60), limit)
        assert time.monotonic() - started < 10
        assert server.memory_info().rss - before < 8 * 2**20, url


def test_a_preflight_whose_client_leaves_is_stopped(up: Up, tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {up.key}"}

    def upload(content: bytes) -> str:
        files = {"file": ("train.jsonl", io.BytesIO(content))}
        answer = httpx.post(
            f"{up.base_url}/files", files=files, data={"purpose": "fine-tune"}, headers=headers
        )
        assert answer.status_code == 200, answer.text
        return str(answer.json()["id"])

    def preflight(file_id: str, timeout: float) -> httpx.Response:
        request = {"model": "tiny", "training_file": file_id}
        return httpx.post(
            f"{up.base_url}/fine_tuning/preflight", json=request, headers=headers, timeout=timeout
        )

    # An ordinary file is counted as before (and the fork server is up).
    ordinary = preflight(upload(write_chat(tmp_path / "train.jsonl", 12).read_bytes()), 300)
    assert ordinary.status_code == 200 and ordinary.json()["training_file"]["n_examples"] == 12, ordinary.text
    # The client gives up on a file that would take minutes (the default limit is 60 s).
    pathological = upload(pathological_lines())
    outcome: list[object] = []

    def give_up() -> None:
        try:
            outcome.append(preflight(pathological, 8))
        except httpx.ReadTimeout as timeout:
            outcome.append(timeout)

    gave_up = threading.Thread(target=give_up)
    gave_up.start()
    running: list[psutil.Process] = []

    def at_work() -> bool:
        running[:] = preflight_children(up.inference)
        return bool(running)

    wait_for(at_work, 8, "the pre-flight child")
    gave_up.join()
    left = time.monotonic()
    assert isinstance(outcome[0], httpx.ReadTimeout), outcome
    psutil.wait_procs(running, timeout=10)
    assert not any(child.is_running() for child in running) and not preflight_children(up.inference)
    assert time.monotonic() - left < 10
    assert "its client left" in up.log.read_text()
