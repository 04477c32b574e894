"""Observability on a real database: /metrics (jobs by status, queue, wait, duration, tokens/s, latency by
route template), /readyz against real and broken dependencies, and JSON log lines carrying request and
job ids, in this process and from the real logging setup of the server commands."""

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from models.db import session_scope
from models.jobs import JobRepository
from models.logs import ContextFilter, json_formatter
from models.orm import JobEvent
from models.settings import Settings
from models.spec import ResolvedHyperparameters
from models.states import JobStatus, transition
from models.storage import LocalArtifactStore
from tests.conftest import RecordingDispatcher, Tenant
from tests.e2e.servers import distributed_env, free_port, process
from tests.jobs_helpers import chat_lines
from tests.test_runner import create_job
from worker.runner import JobRunner

LATENCY = "ftjobs_http_request_duration_seconds"


def scrape(client: TestClient) -> dict[str, list[Sample]]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(samples: list[Sample], suffix: str = "", **labels: str) -> float:
    """The one sample of a family (name ending in `suffix`) whose labels include `labels`."""
    found = [s.value for s in samples if s.name.endswith(suffix) and labels.items() <= s.labels.items()]
    assert len(found) == 1, (suffix, labels, samples)
    return found[0]


def move(factory: sessionmaker[Session], job_id: str, *steps: tuple[JobStatus, JobStatus, dict]) -> None:
    with session_scope(factory) as session:
        for from_, to, values in steps:
            assert transition(session, job_id, from_=from_, to=to, values=values)


def test_metrics_count_time_and_rate_jobs_from_the_database(
    client: TestClient, session_factory: sessionmaker[Session], registered_model: str
) -> None:
    jobs = [create_job(client, registered_model, chat_lines(12)) for _ in range(6)]
    created = {job: client.get(f"/v1/fine_tuning/jobs/{job}").json()["created_at"] for job in jobs}
    waiting, queued, running, succeeded, failed, cancelled = jobs
    v, q, r = JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING

    def start(job: str, after: int) -> tuple[JobStatus, JobStatus, dict]:
        values = {
            "attempt": 1,
            "started_at": created[job] + after,
            "hyperparameters": ResolvedHyperparameters(
                training_type="lora",
                n_epochs=1,
                batch_size=1,
                learning_rate_multiplier=1.0,
                learning_rate=2e-4,
            ),
        }
        return q, r, values

    move(session_factory, queued, (v, q, {}))
    move(session_factory, running, (v, q, {}), start(running, 30))
    finish = {"finished_at": created[succeeded] + 90 + 600, "trained_tokens": 60_000}
    move(session_factory, succeeded, (v, q, {}), start(succeeded, 90), (r, JobStatus.SUCCEEDED, finish))
    end = {"finished_at": created[failed] + 10 + 45}
    move(session_factory, failed, (v, q, {}), start(failed, 10), (r, JobStatus.FAILED, end))
    move(session_factory, cancelled, (v, JobStatus.CANCELLED, {"finished_at": created[cancelled]}))
    # The waiting job has waited 500 s; the queued one was created long ago but queued again just now (its
    # latest event), so it does not count as the oldest.
    now = int(time.time())
    with session_scope(session_factory) as session:
        session.execute(update(JobEvent).where(JobEvent.job_id == waiting).values(created_at=now - 500))
        session.execute(update(JobEvent).where(JobEvent.job_id == queued).values(created_at=now - 10_000))
        JobRepository(session).add_event(queued, "The worker was lost; the job is queued again.")

    metrics = scrape(client)
    assert value(metrics["ftjobs_job_metrics_up"]) == 1
    by_status = {s.labels["status"]: s.value for s in metrics["ftjobs_jobs"]}
    assert by_status == {s.value: 1 for s in JobStatus if s != JobStatus.PAUSED} | {"paused": 0}
    assert value(metrics["ftjobs_queue_depth"]) == 2
    assert 500 <= value(metrics["ftjobs_queue_oldest_wait_seconds"]) < 600

    wait = metrics["ftjobs_job_queue_wait_seconds"]  # 30, 90 and 10 s
    assert (value(wait, "_count"), value(wait, "_sum")) == (3, 130)
    assert [value(wait, "_bucket", le=le) for le in ("5.0", "15.0", "30.0", "60.0", "120.0")] == [
        0,
        1,
        2,
        2,
        3,
    ]
    duration = metrics["ftjobs_job_duration_seconds"]
    assert (
        value(duration, "_sum", status="succeeded") == 600 and value(duration, "_sum", status="failed") == 45
    )
    assert value(duration, "_bucket", status="succeeded", le="300.0") == 0
    assert value(duration, "_bucket", status="succeeded", le="600.0") == 1
    assert value(duration, "_bucket", status="failed", le="60.0") == 1
    assert {s.labels["status"] for s in duration} == {"succeeded", "failed"}  # the cancelled job never ran
    rate = metrics["ftjobs_job_training_tokens_per_second"]  # 60,000 tokens in 600 s
    labels = {"model": registered_model, "training_type": "lora"}
    assert (value(rate, "_count", **labels), value(rate, "_sum", **labels)) == (1, 100)
    assert (
        value(rate, "_bucket", le="50.0", **labels) == 0 and value(rate, "_bucket", le="100.0", **labels) == 1
    )


def test_request_latency_is_labelled_by_route_template(client: TestClient) -> None:
    job = "ftjob-doesnotexist123"
    assert client.get(f"/v1/fine_tuning/jobs/{job}").status_code == 404
    assert client.get("/v1/files/file-abc", headers={"Authorization": ""}).status_code == 401
    assert client.get("/no/such/path/xyz789").status_code == 404
    assert client.request("BREW", "/v1/files").status_code == 405

    latency = scrape(client)[LATENCY]
    counts = {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in latency
        if s.name.endswith("_count")
    }
    assert counts[("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}", "404")] == 1
    assert counts[("GET", "/v1/files/{file_id}", "401")] == 1  # refused before routing, labelled all the same
    assert counts[("GET", "<unmatched>", "404")] == 1
    assert counts[("other", "/v1/files", "405")] == 1
    routes = {s.labels["route"] for s in latency}
    assert not any(raw in route for route in routes for raw in (job, "file-abc", "xyz789"))


def test_metrics_answer_while_the_database_is_down(settings: Settings) -> None:
    down = settings.model_copy(update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/ftjobs"})
    with TestClient(create_app(down, RecordingDispatcher())) as client:
        metrics = scrape(client)
    assert value(metrics["ftjobs_job_metrics_up"]) == 0 and "ftjobs_jobs" not in metrics


def readiness(settings: Settings, dispatcher: RecordingDispatcher | None = None) -> tuple[int, dict]:
    with TestClient(create_app(settings, dispatcher)) as client:
        response = client.get("/readyz")
    return response.status_code, response.json()


def test_readyz_reports_each_dependency(settings: Settings, redis_url: str) -> None:
    status, body = readiness(settings.model_copy(update={"broker_url": redis_url}))
    assert (status, body["status"]) == (200, "ready")
    assert {name: check["status"] for name, check in body["checks"].items()} == {
        "database": "ok",
        "broker": "ok",
        "storage": "ok",
    }
    status, body = readiness(settings, RecordingDispatcher())  # embedded: no broker to check
    assert status == 200 and body["checks"]["broker"]["status"] == "skipped"
    assert "embedded" in body["checks"]["broker"]["detail"]


def test_readyz_is_503_naming_a_broker_that_is_down(settings: Settings) -> None:
    status, body = readiness(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    assert (status, body["status"]) == (503, "unavailable")
    broker = body["checks"]["broker"]
    assert broker["status"] == "error" and "127.0.0.1:1" in broker["detail"]
    assert body["checks"]["database"]["status"] == body["checks"]["storage"]["status"] == "ok"


def test_readyz_is_503_naming_storage_that_cannot_be_written(settings: Settings, tmp_path: Path) -> None:
    blocked = tmp_path / "artifacts"
    blocked.write_text("a file where the artifact directory should be")
    status, body = readiness(settings.model_copy(update={"artifacts_dir": blocked}), RecordingDispatcher())
    assert status == 503 and body["checks"]["storage"]["status"] == "error"
    assert body["checks"]["storage"]["detail"].startswith(("FileExistsError", "NotADirectoryError"))
    assert body["checks"]["database"]["status"] == "ok"


def test_readyz_is_503_naming_a_database_that_is_down(settings: Settings) -> None:
    down = settings.model_copy(update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/ftjobs"})
    status, body = readiness(down, RecordingDispatcher())
    assert status == 503 and body["checks"]["database"]["status"] == "error"
    assert "OperationalError" in body["checks"]["database"]["detail"]


@pytest.fixture
def json_log(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[dict]]]:
    """The JSON lines the service's formatter writes for `ftjobs.*` loggers during the test."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    handler.addFilter(ContextFilter())
    caplog.set_level(logging.DEBUG, logger="ftjobs")
    logging.getLogger("ftjobs").addHandler(handler)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logging.getLogger("ftjobs").removeHandler(handler)


def test_each_request_writes_one_json_access_line_with_its_request_id(
    client: TestClient, json_log: Callable[[], list[dict]]
) -> None:
    response = client.get("/v1/fine_tuning/jobs", headers={"x-request-id": "req-observed-1"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "req-observed-1"
    minted = client.get("/v1/files").headers["x-request-id"]

    lines = [line for line in json_log() if line["logger"] == "ftjobs.access"]
    ours = [line for line in lines if line.get("request_id") == "req-observed-1"]
    assert len(ours) == 1
    assert {k: ours[0][k] for k in ("level", "method", "route", "path", "status")} == {
        "level": "INFO",
        "method": "GET",
        "route": "/v1/fine_tuning/jobs",
        "path": "/v1/fine_tuning/jobs",
        "status": 200,
    }
    assert ours[0]["duration_ms"] >= 0 and ours[0]["time"].endswith("+00:00")
    assert [line["route"] for line in lines if line.get("request_id") == minted] == ["/v1/files"]


def test_an_unhandled_error_is_logged_with_its_request_id(
    settings: Settings, tenant: Tenant, json_log: Callable[[], list[dict]]
) -> None:
    app: FastAPI = create_app(settings, RecordingDispatcher())

    def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/broken", headers={"x-request-id": "req-broken"})
    assert response.status_code == 500
    errors = [line for line in json_log() if line["logger"] == "ftjobs.api"]
    assert [(line["level"], line["request_id"]) for line in errors] == [("ERROR", "req-broken")]
    # The traceback reaches the log, though the route ran in a threadpool outside the handler's `except`.
    assert "RuntimeError: a bug" in errors[0]["exc_info"] and "in broken" in errors[0]["exc_info"]
    access = [line for line in json_log() if line["logger"] == "ftjobs.access"]
    assert [(line["status"], line["request_id"]) for line in access] == [(500, "req-broken")]


def test_a_runners_log_lines_carry_the_job_id(
    client: TestClient,
    settings: Settings,
    session_factory: sessionmaker[Session],
    registered_model: str,
    json_log: Callable[[], list[dict]],
) -> None:
    job_id = create_job(client, registered_model, chat_lines(3))  # too few examples: fails validation
    JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root)).run(job_id)
    worker = [line for line in json_log() if line["logger"] == "ftjobs.worker"]
    assert worker and all(line["job_id"] == job_id for line in worker)
    assert any("invalid_n_examples" in line["message"] for line in worker)
    assert not any("job_id" in line for line in json_log() if line["logger"] == "ftjobs.access")


LOG_SOME = """
import logging
from models.logs import configure_logging, job_context
from models.settings import Settings
configure_logging(Settings())
logging.getLogger("uvicorn.error").info("uvicorn says hello")
with job_context("ftjob-abc"):
    logging.getLogger("ftjobs.worker").warning("training")
logging.getLogger("ftjobs.worker").debug("not shown at the default level")
"""


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_server_logging_setup_writes_what_ftjobs_log_format_says(log_format: str) -> None:
    env = {**os.environ, "FTJOBS_LOG_FORMAT": log_format}
    env.pop("FTJOBS_LOG_LEVEL", None)
    result = subprocess.run(
        [sys.executable, "-c", LOG_SOME], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    if log_format == "json":
        first, second = map(json.loads, lines)
        assert (first["logger"], first["level"], first["message"]) == (
            "uvicorn.error",
            "INFO",
            "uvicorn says hello",
        )
        assert "job_id" not in first and second["job_id"] == "ftjob-abc" and second["level"] == "WARNING"
    else:
        assert lines[0].endswith("INFO uvicorn.error: uvicorn says hello")
        assert lines[1].endswith("WARNING ftjobs.worker: training [job_id=ftjob-abc]")


def test_api_worker_processes_share_their_request_metrics(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    """`ftjobs api --workers 2`: whichever process answers a scrape counts the requests of both."""
    port = free_port()
    env = distributed_env(tmp_path / "data", postgres_url, redis_url, log_format="json")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    base = f"http://127.0.0.1:{port}"
    args = ["api", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    with process(args, env, tmp_path / "api.log", health_url=f"{base}/healthz"):
        for _ in range(20):  # a new connection each time, so both processes take some
            assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
        for _ in range(6):
            families = text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text)
            latency = next(family.samples for family in families if family.name == LATENCY)
            assert value(latency, "_count", method="GET", route="/v1/models", status="401") == 20
    access = [
        json.loads(line)
        for line in (tmp_path / "api.log").read_text().splitlines()
        if '"ftjobs.access"' in line
    ]
    assert sum(1 for line in access if line["route"] == "/v1/models") == 20
