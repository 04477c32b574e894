"""Quotas from settings: unfinished jobs per organisation (429 with Retry-After), examples per file and
tokens per training file (the job fails with the data's own error code)."""

import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from api.webhooks.service import MAX_ENDPOINTS
from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.conftest import RecordingDispatcher, Tenant, make_tenant
from tests.jobs_helpers import chat_lines
from tests.test_api_files import assert_error
from tests.test_runner import create_job, upload
from worker.runner import JobRunner


def test_an_organisation_past_its_unfinished_jobs_gets_429_until_one_ends(
    settings: Settings, session_factory: sessionmaker[Session], registered_model: str, tenant: Tenant
) -> None:
    limited = settings.model_copy(update={"max_active_jobs": 2})
    other = make_tenant(session_factory, "other")
    with TestClient(create_app(limited, RecordingDispatcher()), headers=tenant.headers) as client:
        first, _ = (create_job(client, registered_model, chat_lines(12)) for _ in range(2))
        training_file = upload(client, chat_lines(12))
        body = {"model": registered_model, "training_file": training_file}
        refused = client.post("/v1/fine_tuning/jobs", json=body)
        error = assert_error(refused, 429, code="too_many_active_jobs")
        assert "2 unfinished" in error["message"] and refused.headers["retry-after"] == "60"
        api = openai.OpenAI(
            base_url="http://testserver/v1", api_key=tenant.key, http_client=client, max_retries=0
        )
        with pytest.raises(openai.RateLimitError):
            api.fine_tuning.jobs.create(model=registered_model, training_file=training_file)

        # Another organisation has places of its own; a cancelled job frees one.
        other_file = upload(client, chat_lines(12), other.headers)
        other_body = {"model": registered_model, "training_file": other_file}
        assert client.post("/v1/fine_tuning/jobs", json=other_body, headers=other.headers).status_code == 200
        assert client.post(f"/v1/fine_tuning/jobs/{first}/cancel").status_code == 200
        assert client.post("/v1/fine_tuning/jobs", json=body).status_code == 200


@pytest.mark.parametrize(
    ("limits", "code", "message"),
    [
        ({"max_file_examples": 11}, "invalid_n_examples", "Training file has more than 11 examples"),
        ({"max_file_tokens": 50}, "invalid_n_tokens", "over the limit of 50"),
    ],
)
def test_a_training_file_over_a_size_limit_fails_its_job(
    client: TestClient,
    settings: Settings,
    session_factory: sessionmaker[Session],
    registered_model: str,
    limits: dict[str, int],
    code: str,
    message: str,
) -> None:
    limited = settings.model_copy(update=limits)
    runner = JobRunner(limited, session_factory, LocalArtifactStore(limited.artifacts_root))
    job_id = create_job(client, registered_model, chat_lines(12))
    runner.run(job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == code and job["error"]["param"] == "training_file"
    assert message in job["error"]["message"]


CONCURRENT_CREATES = 32


def _create_concurrently(client: TestClient, path: str, body: dict[str, object]) -> list[int]:
    """The status of `CONCURRENT_CREATES` identical creates sent at once, each from its own thread."""
    start = threading.Barrier(CONCURRENT_CREATES)

    def create(_: int) -> int:
        start.wait()
        return client.post(path, json=body).status_code

    with ThreadPoolExecutor(CONCURRENT_CREATES) as pool:
        return list(pool.map(create, range(CONCURRENT_CREATES)))


def test_concurrent_creates_never_pass_the_unfinished_jobs_cap(
    settings: Settings, registered_model: str, tenant: Tenant
) -> None:
    # SQLite ignores FOR UPDATE: without its write lock taken before the count, creates raced past the cap.
    limited = settings.model_copy(update={"max_active_jobs": 4})
    with TestClient(create_app(limited, RecordingDispatcher()), headers=tenant.headers) as client:
        body = {"model": registered_model, "training_file": upload(client, chat_lines(12))}
        statuses = _create_concurrently(client, "/v1/fine_tuning/jobs", body)
        assert sorted(statuses) == [200] * 4 + [429] * (CONCURRENT_CREATES - 4)
        assert len(client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]) == 4


def test_concurrent_creates_never_pass_the_webhook_endpoints_cap(settings: Settings, tenant: Tenant) -> None:
    with TestClient(create_app(settings, RecordingDispatcher()), headers=tenant.headers) as client:
        body = {"url": "https://hooks.example.com/ftjobs"}
        statuses = _create_concurrently(client, "/v1/webhook_endpoints", body)
        assert sorted(statuses) == [200] * MAX_ENDPOINTS + [400] * (CONCURRENT_CREATES - MAX_ENDPOINTS)
        assert len(client.get("/v1/webhook_endpoints", params={"limit": 100}).json()["data"]) == MAX_ENDPOINTS
