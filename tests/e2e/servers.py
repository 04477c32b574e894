"""Start real ftjobs processes (`python -m cli ...`) for end-to-end tests, and stop them cleanly."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distributed_env(data_dir: Path, database_url: str, broker_url: str, **settings: object) -> dict[str, str]:
    """Environment for `ftjobs api|worker` test processes: their own queue, quick heartbeats, and any
    other settings as keyword arguments (`lease_seconds=4` → FTJOBS_LEASE_SECONDS=4)."""
    env = {
        "FTJOBS_DATA_DIR": str(data_dir),
        "FTJOBS_DATABASE_URL": database_url,
        "FTJOBS_BROKER_URL": broker_url,
        "FTJOBS_WORKER_QUEUE": f"ftjobs-test-{uuid.uuid4().hex[:8]}",
        "FTJOBS_HEARTBEAT_SECONDS": "0.5",
    }
    return env | {f"FTJOBS_{name.upper()}": str(value) for name, value in settings.items()}


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )


def create_key(env: dict[str, str], org: str = "local") -> str:
    """A new API key of `org` (created if new), made with the CLI as an operator would."""
    return cli("keys", "create", "--org", org, env=env).stdout.strip()


@contextmanager
def process(
    args: list[str],
    env: dict[str, str],
    log: Path,
    health_url: str | None = None,
    python: str = sys.executable,
    startup_seconds: float = 60,
    own_group: bool = False,
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m cli ARGS` (`python`: another environment's interpreter, e.g. one with vLLM), healthy
    within `startup_seconds` if `health_url` is given. `own_group`: the process leads a process group,
    stopped as a whole (vLLM's engine processes outlive a killed parent)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [python, "-m", "cli", *args],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=own_group,
        )
    try:
        if health_url:
            deadline = time.monotonic() + startup_seconds
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if httpx.get(health_url, timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if own_group:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
