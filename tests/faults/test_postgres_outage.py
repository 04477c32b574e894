"""Fault injection: the database goes away for 10 s in the middle of a training run.

The shared Postgres server must keep serving other tests, so the API and the worker reach it through a
TCP proxy, and the outage is the proxy dropping every connection and refusing new ones. The job must
keep training through it (same trainer process, same attempt), the API must answer 503 with
`Retry-After` meanwhile, and both must recover on their own.
"""

import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import fresh_postgres_database
from tests.e2e.servers import cli, create_key, distributed_env, free_port, process
from tests.faults.jobs_db import STARTED, event_counts, job_rows
from tests.faults.tcp_proxy import TcpProxy
from tests.jobs_helpers import TERMINAL, write_chat

pytestmark = pytest.mark.e2e

OUTAGE_SECONDS = 10
LEASE_SECONDS = 30  # comfortably above the outage: the attempt must not be given up
# 160 steps at batch size 1: 0.1-0.3 s each on 2 busy cores, so training outlasts the outage.
N_EXAMPLES, N_EPOCHS = 40, 4


def trainer_pids(job_id: str) -> set[str]:
    found = subprocess.run(
        ["pgrep", "-f", f"worker.training --spec .*{job_id}"], capture_output=True, text=True
    )
    return set(found.stdout.split())


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


def test_training_rides_out_a_database_outage(tmp_path: Path, tiny_model_dir: Path, redis_url: str) -> None:
    with fresh_postgres_database() as database_url, TcpProxy(5432) as proxy:
        proxied_url = database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        assert proxied_url != database_url
        env = distributed_env(
            tmp_path / "data", proxied_url, redis_url, lease_seconds=LEASE_SECONDS, reconcile_seconds=1
        )
        cli("models", "add", "tiny-llama", str(tiny_model_dir), env=env)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
        api_args = ["api", "--host", "127.0.0.1", "--port", str(port)]
        with process(api_args, env, api_log, f"{base}/healthz"), process(["worker"], env, worker_log):
            key = create_key(env)
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)
            auth = {"Authorization": f"Bearer {key}"}
            with open(write_chat(tmp_path / "train.jsonl", N_EXAMPLES), "rb") as train:
                training_file = client.files.create(file=train, purpose="fine-tune").id
            hyperparameters = {"n_epochs": N_EPOCHS, "batch_size": 1, "max_seq_length": 256}
            job_id = client.fine_tuning.jobs.create(
                model="tiny-llama",
                training_file=training_file,
                method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},  # type: ignore[typeddict-unknown-key]
            ).id
            job_url = f"{base}/v1/fine_tuning/jobs/{job_id}"

            # Cut once the trainer is really training, so the outage falls inside the run.
            deadline = time.monotonic() + 120
            while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job_id)):
                assert time.monotonic() < deadline, tail(worker_log)
                time.sleep(0.3)
            trainers = trainer_pids(job_id)
            assert len(trainers) == 1, trainers

            proxy.cut()
            try:
                cut_at = time.monotonic()
                during: list[httpx.Response] = []
                while time.monotonic() - cut_at < OUTAGE_SECONDS:
                    during.append(httpx.get(job_url, headers=auth, timeout=10))
                    time.sleep(1)
            finally:
                proxy.restore()
            # Whether the trainer is still running now depends on the machine's speed (it may finish while
            # its reports wait in the pipe); that it was never killed is proved below: one attempt, no
            # requeue, every step recorded.

            statuses = [r.status_code for r in during]
            assert statuses and set(statuses) == {503}, (statuses, tail(api_log))
            assert all(r.headers.get("Retry-After") for r in during)

            deadline = time.monotonic() + 15
            while httpx.get(job_url, headers=auth, timeout=10).status_code != 200:
                assert time.monotonic() < deadline, f"the API did not recover:\n{tail(api_log)}"
                time.sleep(0.5)

            deadline = time.monotonic() + 180
            while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in TERMINAL:
                assert time.monotonic() < deadline, f"the job did not finish:\n{tail(worker_log)}"
                time.sleep(0.5)
            assert job.status == "succeeded", (job.error, tail(worker_log))
            events = client.fine_tuning.jobs.list_events(job_id, limit=1000).data

        steps = sorted(e.data["step"] for e in events if e.type == "metrics")  # type: ignore[index]
        total = N_EXAMPLES * N_EPOCHS
        assert steps[-1] == total and set(steps) == set(range(1, total + 1)), steps
        assert not [e.message for e in events if e.level != "info"]  # no requeue, no lost lease
        row = job_rows(database_url)[job_id]
        assert row.attempt == 1 and row.status == "succeeded", row
        assert event_counts(database_url, STARTED)[job_id] == 1
        attempts = sorted(p.name for p in (tmp_path / "data" / "artifacts" / "jobs" / job_id).iterdir())
        assert attempts == ["attempt-1"], attempts
