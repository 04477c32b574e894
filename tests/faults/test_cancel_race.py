"""Cancel racing completion: the runner's real publish path against the API's cancel, many times over.

No training: each iteration makes a job `running` on attempt 1 and a finished trainer's output (a small
adapter directory and a results CSV), then releases the runner's publish and a `POST .../cancel` at once.
Exactly one may win; a cancelled job must keep nothing of what its runner tried to publish.
"""

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from models.db import make_engine, make_session_factory, session_scope
from models.hyperparameters import SupervisedHyperparameters, resolve
from models.migrate import upgrade
from models.orm import File
from models.registry import ModelRegistry
from models.settings import Settings
from models.spec import CompletedMessage
from models.states import JobStatus, transition
from models.storage import LocalArtifactStore
from models.validation import FileSummary
from tests.conftest import RecordingDispatcher, fresh_postgres_database, make_tenant
from tests.jobs_helpers import prompt_completion_lines
from worker.runner import Attempt, JobData, JobRunner

pytestmark = pytest.mark.e2e

ITERATIONS = 200
# Both sides start after a random pause of up to this long, so neither always reaches its CAS first.
JITTER_SECONDS = 0.03


@pytest.fixture(params=["postgres", "sqlite"])
def race_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ftjobs.db'}"
        upgrade(url)
        yield url
    else:
        with fresh_postgres_database() as url:
            yield url


TRAINED = JobData(FileSummary("prompt_completion", 10), "sft", SupervisedHyperparameters())
"""What validation learnt of the jobs these tests publish (their files are never read)."""


def trainer_output(root: Path) -> CompletedMessage:
    """What a trainer leaves behind when it finishes; the store copies it, so it serves every iteration."""
    adapter = root / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    csv = root / "step_metrics.csv"
    csv.write_text("step,train_loss,train_accuracy\n1,0.5,0.9\n")
    return CompletedMessage(
        step=1,
        adapter_path=str(adapter),
        results_csv=str(csv),
        trained_tokens=100,
        metrics={"train_loss": 0.5},
    )


def running_job(client: TestClient, factory: sessionmaker[Session], training_file: str) -> str:
    """A job created through the API, then claimed as attempt 1 the way a runner claims it."""
    body = {"model": "tiny-llama", "training_file": training_file}
    response = client.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    job_id: str = response.json()["id"]
    now = time.time()
    with session_scope(factory) as session:
        assert transition(session, job_id, from_=JobStatus.VALIDATING_FILES, to=JobStatus.QUEUED)
        claimed = {
            "attempt": 1,
            "hyperparameters": resolve(TRAINED.requested, TRAINED.summary.n_examples, "sft").model_dump(),
            "started_at": int(now),
            "heartbeat_at": now,
            "lease_expires_at": now + 600,
        }
        assert transition(
            session, job_id, from_=JobStatus.QUEUED, to=JobStatus.RUNNING, attempt=0, values=claimed
        )
    return job_id


def race(attempt: Attempt, done: CompletedMessage, client: TestClient, pool: ThreadPoolExecutor) -> int:
    """Release the runner's publish and the API's cancel together; return the cancel's status code."""
    barrier = threading.Barrier(2)

    def publish() -> None:
        barrier.wait()
        time.sleep(random.uniform(0, JITTER_SECONDS))
        attempt._db(lambda: attempt._publish(done))  # as Attempt.run calls it

    def cancel() -> int:
        barrier.wait()
        time.sleep(random.uniform(0, JITTER_SECONDS))
        return client.post(f"/v1/fine_tuning/jobs/{attempt.job_id}/cancel").status_code

    published, cancelled = pool.submit(publish), pool.submit(cancel)
    published.result(timeout=60)
    return cancelled.result(timeout=60)


def test_cancel_racing_completion_has_one_winner_and_leaves_nothing_behind(
    race_database: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    # Hundreds of requests in a minute from one key: not what is tested here.
    settings = Settings(data_dir=tmp_path / "data", database_url=race_database, rate_limit_per_minute=0)
    engine = make_engine(race_database)
    factory = make_session_factory(engine)
    store = LocalArtifactStore(settings.artifacts_root)
    runner = JobRunner(settings, factory, store)
    done = trainer_output(tmp_path / "trainer")
    with session_scope(factory) as session:
        # Never loaded: nothing trains here.
        ModelRegistry(session).register("tiny-llama", str(tiny_model_dir), "local")

    def result_rows() -> int:
        with session_scope(factory) as session:
            return session.scalar(select(func.count()).where(File.purpose == "fine-tune-results")) or 0

    outcomes: Counter[str] = Counter()
    finals: dict[str, dict[str, object]] = {}
    app = create_app(settings, RecordingDispatcher())
    try:
        headers = make_tenant(factory, "local").headers
        with (
            TestClient(app, raise_server_exceptions=False, headers=headers) as client,
            ThreadPoolExecutor(2) as pool,
        ):
            upload = {"file": ("train.jsonl", prompt_completion_lines(10))}
            training_file = client.post("/v1/files", files=upload, data={"purpose": "fine-tune"}).json()["id"]
            for _ in range(ITERATIONS):
                job_id = running_job(client, factory, training_file)
                cancel_status = race(Attempt(runner, job_id, 1, TRAINED), done, client, pool)

                job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
                adapter = settings.artifacts_root / "jobs" / job_id / "attempt-1" / "adapter"
                outcomes[job["status"]] += 1
                if job["status"] == "succeeded":
                    assert cancel_status == 400, "cancel answered 200 but the job succeeded"
                    assert job["fine_tuned_model"] and len(job["result_files"]) == 1, job
                    results = client.get(f"/v1/files/{job['result_files'][0]}").json()
                    assert results["purpose"] == "fine-tune-results", results
                    assert (adapter / "adapter_model.safetensors").exists()
                else:
                    assert job["status"] == "cancelled" and cancel_status == 200, (job, cancel_status)
                    assert job["fine_tuned_model"] is None and job["result_files"] == [], job
                    assert not adapter.exists() and not adapter.with_name("adapter.partial").exists()
                # A lost publish leaves neither a results file row nor its bytes behind.
                assert result_rows() == outcomes["succeeded"]
                stored = list((settings.artifacts_root / "files").iterdir())
                assert len(stored) == 1 + outcomes["succeeded"], sorted(p.name for p in stored)
                finals[job_id] = job

            # Terminal means terminal: a late cancel changes nothing, nor does a late publish of a
            # cancelled job (a late publish of a succeeded one: see the next test).
            for job_id, final in finals.items():
                if final["status"] == "cancelled":
                    Attempt(runner, job_id, 1, TRAINED)._publish(done)
                assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 400
                assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json() == final
                adapter = settings.artifacts_root / "jobs" / job_id / "attempt-1" / "adapter"
                assert adapter.exists() == (final["status"] == "succeeded"), job_id
            assert result_rows() == outcomes["succeeded"]
    finally:
        app.state.engine.dispose()
        engine.dispose()

    assert sum(outcomes.values()) == ITERATIONS and set(outcomes) <= {"succeeded", "cancelled"}, outcomes
    # If one side always wins, the race is not being exercised and the test proves nothing.
    assert outcomes["succeeded"] >= 1 and outcomes["cancelled"] >= 1, outcomes
    print(f"{race_database.split(':')[0]}: {dict(outcomes)}")


def test_a_retried_publish_keeps_the_published_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ftjobs.db'}"
    upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    runner = JobRunner(settings, factory, LocalArtifactStore(settings.artifacts_root))
    done = trainer_output(tmp_path / "trainer")
    with session_scope(factory) as session:
        ModelRegistry(session).register("tiny-llama", str(tiny_model_dir), "local")
    app = create_app(settings, RecordingDispatcher())
    try:
        with TestClient(app, headers=make_tenant(factory, "local").headers) as client:
            upload = {"file": ("train.jsonl", prompt_completion_lines(10))}
            training_file = client.post("/v1/files", files=upload, data={"purpose": "fine-tune"}).json()["id"]
            job_id = running_job(client, factory, training_file)
            attempt = Attempt(runner, job_id, 1, TRAINED)
            attempt._publish(done)
            # The COMMIT went through but the connection died before its reply: `_db` runs it again.
            attempt._publish(done)
            assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "succeeded"
        assert (settings.artifacts_root / "jobs" / job_id / "attempt-1" / "adapter").exists()
    finally:
        app.state.engine.dispose()
        engine.dispose()
