"""Idempotency-Key on POSTs, on Postgres and SQLite: retries replay, never duplicate."""

import io
import threading

from fastapi.testclient import TestClient

from tests.conftest import RecordingDispatcher
from tests.test_api_files import LINE, assert_error


def create(client: TestClient, key: str | None, model: str, training_file: str, **extra: object):  # type: ignore[no-untyped-def]
    headers = {"Idempotency-Key": key} if key else {}
    body = {"model": model, "training_file": training_file, **extra}
    return client.post("/v1/fine_tuning/jobs", json=body, headers=headers)


def upload(client: TestClient, key: str, content: bytes = LINE.encode() * 10):  # type: ignore[no-untyped-def]
    files = {"file": ("train.jsonl", io.BytesIO(content))}
    return client.post(
        "/v1/files", files=files, data={"purpose": "fine-tune"}, headers={"Idempotency-Key": key}
    )


def test_job_create_replays_the_first_response(
    client: TestClient, registered_model: str, dispatcher: RecordingDispatcher
) -> None:
    training_file = upload(client, "file-key").json()["id"]
    first = create(client, "job-key", registered_model, training_file, suffix="a")
    again = create(client, "job-key", registered_model, training_file, suffix="a")
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs").json()["data"]] == [first.json()["id"]]
    assert dispatcher.submitted == [first.json()["id"]]
    other = create(client, "job-key", registered_model, training_file, suffix="b")
    assert_error(other, 400, "Idempotency-Key", "idempotency_key_reused")
    assert create(client, None, registered_model, training_file).json()["id"] != first.json()["id"]


def test_uploads_and_cancels_are_idempotent(client: TestClient, registered_model: str) -> None:
    first = upload(client, "u1").json()
    assert upload(client, "u1").json() == first
    assert_error(upload(client, "u1", b"different\n"), 400, "Idempotency-Key", "idempotency_key_reused")
    assert len(client.get("/v1/files").json()["data"]) == 1
    job_id = create(client, None, registered_model, first["id"]).json()["id"]
    url = f"/v1/fine_tuning/jobs/{job_id}/cancel"
    cancelled = client.post(url, headers={"Idempotency-Key": "c1"})
    replayed = client.post(url, headers={"Idempotency-Key": "c1"})
    assert cancelled.status_code == replayed.status_code == 200 and replayed.json() == cancelled.json()
    assert_error(client.post(url, headers={"Idempotency-Key": "c2"}), 400)  # a new key: already cancelled


def test_a_failed_request_does_not_burn_its_key(client: TestClient, registered_model: str) -> None:
    assert_error(create(client, "k", registered_model, "file-missing"), 400, "training_file")
    training_file = upload(client, "f").json()["id"]
    assert create(client, "k", registered_model, training_file).status_code == 200


def test_key_length_is_checked(client: TestClient, registered_model: str) -> None:
    assert_error(create(client, "x" * 256, registered_model, "file-x"), 400, "Idempotency-Key")


def test_concurrent_retries_create_one_job(client: TestClient, registered_model: str) -> None:
    training_file = upload(client, "f").json()["id"]
    barrier = threading.Barrier(8)
    responses = []

    def post() -> None:
        barrier.wait()
        responses.append(create(client, "same", registered_model, training_file))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(client.get("/v1/fine_tuning/jobs").json()["data"]) == 1


def test_keys_expire_after_a_day(client: TestClient, registered_model: str, session_factory) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import func, select, update

    from models.db import session_scope
    from models.idempotency import IdempotencyRepository
    from models.orm import IdempotencyKey

    training_file = upload(client, "old").json()["id"]
    with session_scope(session_factory) as session:
        session.execute(update(IdempotencyKey).values(created_at=IdempotencyKey.created_at - 24 * 3600))
    assert upload(client, "old").json()["id"] != training_file  # the old key is forgotten, not replayed
    with session_scope(session_factory) as session:
        session.execute(update(IdempotencyKey).values(created_at=IdempotencyKey.created_at - 24 * 3600))
        assert IdempotencyRepository(session).expire() == 1
        assert session.scalar(select(func.count()).select_from(IdempotencyKey)) == 0


def test_a_replay_does_not_show_a_webhook_secret_again(client: TestClient, session_factory) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from models.db import session_scope
    from models.orm import IdempotencyKey

    def post(url: str, key: str, body: dict[str, object]):  # type: ignore[no-untyped-def]
        return client.post(url, json=body, headers={"Idempotency-Key": key})

    body = {"url": "https://hooks.example.com/x"}
    created = post("/v1/webhook_endpoints", "create", body)
    replayed = post("/v1/webhook_endpoints", "create", body)
    rotate = f"/v1/webhook_endpoints/{created.json()['id']}/rotate_secret"
    rotated = post(rotate, "rotate", {"keep_old_secret_active_for_24_hours": True})
    replayed_rotation = post(rotate, "rotate", {"keep_old_secret_active_for_24_hours": True})
    secrets = [created.json()["signing_secret"], rotated.json()["signing_secret"]]
    assert all(secret.startswith("whsec_") for secret in secrets)
    for first, again in [(created, replayed), (rotated, replayed_rotation)]:
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json() | {"signing_secret": None}  # the same endpoint, no secret
    assert len(client.get("/v1/webhook_endpoints").json()["data"]) == 1
    with session_scope(session_factory) as session:
        stored = [row.response for row in session.scalars(select(IdempotencyKey))]
    assert len(stored) == 2 and not any(secret in str(stored) for secret in secrets)
