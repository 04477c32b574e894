"""Fault injection on the broker: Redis loses every message, or cannot be reached at all.

The tests share one Redis server, so this file's broker is a Redis database of its own (db 11) and the
fault is `FLUSHDB` on it. The service's broker lives entirely in that database, so for the service this
is the same as `FLUSHALL` (or Redis restarting empty), and the other tests' databases are not disturbed.
"""

import base64
import json
import time
from pathlib import Path

import openai
import pytest
import redis

from models.queue import RUN_JOB, make_celery
from models.settings import Settings
from tests.conftest import fresh_postgres_database
from tests.e2e.servers import cli, create_key, distributed_env, free_port, process
from tests.faults.jobs_db import JobRow, event_counts, job_rows
from tests.jobs_helpers import TERMINAL, prompt_completion_lines

pytestmark = pytest.mark.e2e

N_JOBS = 10
DUPLICATES = 3
METHOD = {
    "type": "supervised",
    "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 10, "max_seq_length": 128}},
}
OWN_REDIS_DB = 11
UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1
CREATE_BOUND_SECONDS = 5.0


def queued_job_ids(broker: redis.Redis, queue: str) -> set[str]:
    """Job ids of the messages waiting in a Celery queue (kombu on Redis: a list of JSON envelopes whose
    base64 body is `[args, kwargs, embed]`)."""
    return {
        json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0] for raw in broker.lrange(queue, 0, -1)
    }


def service_env(tmp_path: Path, database_url: str, broker_url: str) -> dict[str, str]:
    return distributed_env(
        tmp_path / "data", database_url, broker_url, reconcile_seconds=1, redispatch_seconds=2
    )


def test_jobs_survive_a_flushed_broker_and_duplicates_run_once(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    broker_url = f"{redis_url.rsplit('/', 1)[0]}/{OWN_REDIS_DB}"
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    try:
        with fresh_postgres_database() as database_url:
            env = service_env(tmp_path, database_url, broker_url)
            queue = env["FTJOBS_WORKER_QUEUE"]
            cli("models", "add", "tiny-llama", str(tiny_model_dir), env=env)
            port = free_port()
            api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
            with process(
                ["api", "--host", "127.0.0.1", "--port", str(port)],
                env,
                api_log,
                f"http://127.0.0.1:{port}/healthz",
            ):
                client = openai.OpenAI(
                    base_url=f"http://127.0.0.1:{port}/v1", api_key=create_key(env), max_retries=0
                )
                upload = ("train.jsonl", prompt_completion_lines(10))
                training_file = client.files.create(file=upload, purpose="fine-tune").id
                jobs = {
                    client.fine_tuning.jobs.create(
                        model="tiny-llama",
                        training_file=training_file,
                        method=METHOD,  # type: ignore[arg-type]
                    ).id
                    for _ in range(N_JOBS)
                }
                assert len(jobs) == N_JOBS
                assert queued_job_ids(broker, queue) >= jobs, "the API did not publish its wake-ups"

                broker.flushdb()
                assert broker.llen(queue) == 0
                # Nobody but the reconcilers publishes now, and no worker consumes: the queue must refill.
                deadline = time.monotonic() + 30
                while not queued_job_ids(broker, queue) >= jobs:
                    assert time.monotonic() < deadline, f"not re-published:\n{api_log.read_text()[-3000:]}"
                    time.sleep(0.3)

                # Duplicate deliveries on top of the reconciler's own re-publications.
                celery = make_celery(Settings(broker_url=broker_url, worker_queue=queue))
                for job_id in jobs:
                    for _ in range(DUPLICATES):
                        celery.send_task(RUN_JOB, args=[job_id], queue=queue)

                first_terminal: dict[str, JobRow] = {}
                with process(["worker"], env, worker_log):
                    deadline = time.monotonic() + 300
                    while len(first_terminal) < N_JOBS:
                        assert time.monotonic() < deadline, (
                            f"jobs unfinished:\n{worker_log.read_text()[-3000:]}"
                        )
                        for job_id, row in job_rows(database_url).items():
                            if row.status in TERMINAL:
                                first_terminal.setdefault(job_id, row)
                        time.sleep(0.5)
                    # A late redelivery of every finished job must change nothing.
                    for job_id in jobs:
                        celery.send_task(RUN_JOB, args=[job_id], queue=queue)
                    deadline = time.monotonic() + 60
                    while broker.llen(queue):
                        assert time.monotonic() < deadline, "the worker stopped consuming"
                        time.sleep(0.3)
                    time.sleep(2)  # the solo worker may still be handling the last message it took
                final, started = job_rows(database_url), event_counts(database_url)

        assert final == first_terminal, "a terminal job changed afterwards"
        for job_id in jobs:
            row = final[job_id]
            assert row.status == "succeeded" and row.fine_tuned_model, (job_id, row)
            assert row.attempt == 1 and len(row.result_files) == 1, (job_id, row)
            attempts = sorted(p.name for p in (tmp_path / "data" / "artifacts" / "jobs" / job_id).iterdir())
            assert attempts == ["attempt-1"], (job_id, attempts)
        assert {job_id: started[job_id] for job_id in jobs} == dict.fromkeys(jobs, 1)
    finally:
        broker.flushdb()


def test_create_answers_while_the_broker_is_unreachable(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The job is committed before its wake-up is sent, so a dead broker costs a delay, not a request."""
    with fresh_postgres_database() as database_url:
        env = service_env(tmp_path, database_url, UNREACHABLE_BROKER)
        cli("models", "add", "tiny-llama", str(tiny_model_dir), env=env)
        port = free_port()
        with process(
            ["api", "--host", "127.0.0.1", "--port", str(port)],
            env,
            tmp_path / "api.log",
            f"http://127.0.0.1:{port}/healthz",
        ):
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=create_key(env), max_retries=0, timeout=30
            )
            training_file = client.files.create(
                file=("train.jsonl", prompt_completion_lines(10)), purpose="fine-tune"
            ).id
            created, timings = [], []
            for _ in range(2):
                started = time.monotonic()
                job = client.fine_tuning.jobs.create(
                    model="tiny-llama",
                    training_file=training_file,
                    method=METHOD,  # type: ignore[arg-type]
                )
                timings.append(time.monotonic() - started)
                created.append(job.id)
                time.sleep(3)  # let the reconciler try (and fail) to re-publish in between
            assert max(timings) < CREATE_BOUND_SECONDS, timings
            assert client.fine_tuning.jobs.retrieve(created[0]).status == "validating_files"
        rows = job_rows(database_url)
        assert set(rows) == set(created)
        assert {row.status for row in rows.values()} == {"validating_files"}
