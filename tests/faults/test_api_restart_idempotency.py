"""Fault injection: the API is killed (-9) under 100 concurrent idempotent creates, then restarted.

Each client retries whatever did not get a 200, with the same `Idempotency-Key` and body. Whatever the
kill interrupted (a request not read yet, one mid-transaction, one committed whose reply was lost), the
end state must be exactly one job per key, and every key replays its job.
"""

import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from models.db import make_engine
from models.orm import IdempotencyKey
from tests.conftest import fresh_postgres_database
from tests.e2e.servers import cli, create_key, distributed_env, free_port, process
from tests.faults.jobs_db import job_rows
from tests.jobs_helpers import prompt_completion_lines

pytestmark = pytest.mark.e2e

N_REQUESTS = 100
KILL_AFTER = 15  # answered requests; the others are still queued or in flight
RETRY_SECONDS = 60


def idempotency_keys(database_url: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(IdempotencyKey)) or 0
    finally:
        engine.dispose()


def test_killed_api_loses_and_duplicates_no_idempotent_create(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    with fresh_postgres_database() as database_url:
        # No worker: nothing consumes, so every job stays unfinished; the quota is not what is tested.
        env = distributed_env(tmp_path / "data", database_url, redis_url, max_active_jobs=10 * N_REQUESTS)
        cli("models", "add", "tiny-llama", str(tiny_model_dir), env=env)
        auth = {"Authorization": f"Bearer {create_key(env)}"}
        port = free_port()
        base, args = f"http://127.0.0.1:{port}", ["api", "--host", "127.0.0.1", "--port", str(port)]
        jobs_url = f"{base}/v1/fine_tuning/jobs"
        keys = [f"create-{i}-{uuid.uuid4().hex[:8]}" for i in range(N_REQUESTS)]

        def post(key: str) -> httpx.Response:
            body = {"model": "tiny-llama", "training_file": training_file, "metadata": {"key": key}}
            return httpx.post(jobs_url, json=body, headers={**auth, "Idempotency-Key": key}, timeout=30)

        answered: list[str] = []
        enough = threading.Event()

        def first_try(key: str) -> httpx.Response | None:
            """The response, or None when the kill cut the request off."""
            try:
                return post(key)
            except httpx.TransportError:
                return None
            finally:
                answered.append(key)
                if len(answered) >= KILL_AFTER:
                    enough.set()

        with process(args, env, tmp_path / "api-1.log", f"{base}/healthz") as api:
            upload = {"file": ("train.jsonl", prompt_completion_lines(10))}
            training_file = httpx.post(
                f"{base}/v1/files", files=upload, data={"purpose": "fine-tune"}, headers=auth
            ).json()["id"]
            with ThreadPoolExecutor(N_REQUESTS) as pool:
                futures = {key: pool.submit(first_try, key) for key in keys}
                assert enough.wait(60), "the API answered too few requests"
                os.kill(api.pid, signal.SIGKILL)
                first = {key: future.result() for key, future in futures.items()}

        job_of: dict[str, str] = {}
        for key, response in first.items():
            if response is not None and response.status_code == 200:
                job_of[key] = response.json()["id"]
            elif response is not None:  # "retry shortly" is fine; anything else is a wrong answer
                assert response.status_code == 503, response.text
        cut_off = [key for key in keys if key not in job_of]
        assert cut_off, "every request finished before the kill: nothing was in flight"

        replayed_after_kill = 0
        with process(args, env, tmp_path / "api-2.log", f"{base}/healthz"):
            deadline = time.monotonic() + RETRY_SECONDS
            for key in cut_off:
                while True:
                    try:
                        response = post(key)
                    except httpx.TransportError:
                        pass
                    else:
                        if response.status_code == 200:
                            break
                        assert response.status_code == 503, response.text
                    assert time.monotonic() < deadline, f"{key} never got a 200"
                    time.sleep(0.2)
                assert response.json()["metadata"] == {"key": key}
                job_of[key] = response.json()["id"]
                # A replay here means the killed API had committed the job but never answered.
                replayed_after_kill += response.headers.get("Idempotent-Replayed") == "true"

            for key in keys:  # every key now replays its one job
                response = post(key)
                assert response.status_code == 200, response.text
                assert response.headers.get("Idempotent-Replayed") == "true", key
                assert response.json()["id"] == job_of[key], key

        assert len(set(job_of.values())) == N_REQUESTS
        rows = job_rows(database_url)
        assert set(rows) == set(job_of.values())
        assert idempotency_keys(database_url) == N_REQUESTS
        print(
            f"cut off by the kill: {len(cut_off)}, of which committed but unanswered: {replayed_after_kill}"
        )
