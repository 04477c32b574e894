"""The server as `ftjobs serve` runs it: its own process (uvicorn), reached over HTTP. Marked e2e: most of
its time is the new process importing torch, transformers and peft."""

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.servers import free_port
from tests.inference.conftest import chat_body, target

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.e2e


@pytest.fixture
def server(artifacts_root: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "FTJOBS_DATA_DIR": str(artifacts_root.parent),
        "FTJOBS_INFERENCE_URL": f"http://127.0.0.1:{port}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    log = tmp_path / "inference.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "inference"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_served_process_streams_chunks_over_http(server: str, base_dir: Path) -> None:
    body = chat_body(target(base_dir, "lora-a"), temperature=0, max_tokens=8, stream=True)
    with httpx.stream("POST", f"{server}/internal/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    body = chat_body(target(base_dir, "mismatch"), max_tokens=2)
    response = httpx.post(f"{server}/internal/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "model_mismatch"
