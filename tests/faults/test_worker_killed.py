"""Fault injection on real processes: kill -9 a Celery worker at a random step; another worker resumes the
job from its last checkpoint and finishes it."""

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import fresh_postgres_database
from tests.e2e.servers import cli, create_key, distributed_env, free_port, process
from tests.jobs_helpers import TERMINAL, write_chat

pytestmark = pytest.mark.e2e


def test_killed_worker_job_resumes_elsewhere(tmp_path: Path, tiny_model_dir: Path, redis_url: str) -> None:
    with fresh_postgres_database() as database_url:
        env = distributed_env(
            tmp_path / "data",
            database_url,
            redis_url,
            lease_seconds=4,
            reconcile_seconds=1,
            checkpoint_every_steps=3,
        )
        cli("models", "add", "tiny-llama", str(tiny_model_dir), env=env)
        port = free_port()
        health = f"http://127.0.0.1:{port}/healthz"
        with process(["api", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path / "api.log", health):
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=create_key(env), max_retries=0
            )
            with open(write_chat(tmp_path / "train.jsonl", 30), "rb") as train:
                training_file = client.files.create(file=train, purpose="fine-tune")
            hyperparameters = {"n_epochs": 4, "batch_size": 1, "max_seq_length": 512}
            job = client.fine_tuning.jobs.create(
                model="tiny-llama",
                training_file=training_file.id,
                method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},  # type: ignore[typeddict-unknown-key]
            )
            with process(["worker"], env, tmp_path / "worker-1.log") as first:
                deadline = time.monotonic() + 120
                kill_after = random.randint(4, 40)  # a random step past the first checkpoint
                while not any(
                    e.type == "metrics" and e.data["step"] >= kill_after  # type: ignore[index]
                    for e in client.fine_tuning.jobs.list_events(job.id, limit=100)
                ):
                    assert time.monotonic() < deadline, (tmp_path / "worker-1.log").read_text()
                    time.sleep(0.3)
                os.kill(first.pid, signal.SIGKILL)
            time.sleep(1)
            trainers = subprocess.run(
                ["pgrep", "-f", f"worker.training --spec .*{job.id}"], capture_output=True
            )
            assert trainers.stdout == b"", "the trainer outlived its killed worker"

            with process(["worker"], env, tmp_path / "worker-2.log"):
                deadline = time.monotonic() + 180
                while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in TERMINAL:
                    assert time.monotonic() < deadline, (tmp_path / "worker-2.log").read_text()
                    time.sleep(0.5)
            assert job.status == "succeeded", job.error
            messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
            assert any("Attempt 1 stopped reporting" in m for m in messages)
            resumed = [
                int(m.group(1)) for text in messages if (m := re.search(r"resumed from step (\d+)", text))
            ]
            assert resumed and resumed[0] >= 3, messages  # not from scratch: from a checkpoint of attempt 1
            final_step = [
                e for e in client.fine_tuning.jobs.list_events(job.id, limit=1000) if e.type == "metrics"
            ]
            assert final_step[0].data["step"] == final_step[0].data["total_steps"] == 120  # type: ignore[index]
        assert (tmp_path / "data" / "artifacts" / "jobs" / job.id / "attempt-2" / "adapter").exists()
