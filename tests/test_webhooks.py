"""Webhooks on both databases, to a real HTTP receiver on 127.0.0.1: job events arrive once, in OpenAI's
shape, and the official openai client's `webhooks.unwrap` verifies them; failing receivers are retried with
growing delays, then given up on; events reach only the subscribed endpoints of the job's organisation;
two senders on Postgres don't send one event twice; a receiver that drips its answer is cut off at the
attempt's deadline and doesn't delay another organisation's events; private addresses are refused unless
allowed; the endpoint routes work through `client.webhooks`."""

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.webhooks import (
    FineTuningJobCancelledWebhookEvent,
    FineTuningJobFailedWebhookEvent,
    FineTuningJobSucceededWebhookEvent,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from models import ids
from models.db import session_scope
from models.jobs import JobRepository
from models.orm import Job, WebhookDelivery
from models.settings import Settings
from models.states import JobStatus, transition
from tests.conftest import RecordingDispatcher, Tenant, make_tenant
from tests.jobs_helpers import chat_lines, wait_for
from tests.test_api_models import openai_client
from tests.test_runner import create_job, runner  # noqa: F401 (runner: a fixture)
from worker.runner import JobRunner
from worker.webhooks import PER_ENDPOINT, PER_ORGANIZATION, SNIPPET_CHARS, WebhookSender

ALL = ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]
BASE = 0.05
"""Retry base delay in these tests, seconds."""
EPS = 1e-6


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """The conftest's, with local receivers allowed and retries fast."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        heartbeat_seconds=0.5,
        webhook_allow_private_urls=True,
        webhook_retry_base_seconds=BASE,
        webhook_timeout_seconds=5,
    )


class Receiver:
    """A webhook receiver: records each request; answers the queued status codes, then 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[int] = []
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                with lock:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.answers.pop(0) if receiver.answers else 200
                reply = b"ok" if status < 300 else b"receiver broke: " + b"x" * 1000
                self.send_response(status)
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


class Tarpit:
    """A receiver that reads the request, then answers a byte every `drip` seconds, for `lasts` seconds:
    each read of the sender's gets a byte well within its timeout (finding 2 of the security review)."""

    def __init__(self, drip: float = 0.2, lasts: float = 15) -> None:
        self.drip, self.lasts = drip, lasts
        self.server = socket.create_server(("127.0.0.1", 0))
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.open = self.most_open = self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}/tarpit"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with self.lock:
            self.requests += 1
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        answer = b"HTTP/1.1 200 OK\r\nx-slow: " + b"a" * 10_000
        with connection:
            connection.recv(65536)
            for byte in answer[: int(self.lasts / self.drip)]:
                if self.closed.wait(self.drip):
                    break
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    break  # the sender hung up
        with self.lock:
            self.open -= 1

    def close(self) -> None:
        self.closed.set()
        self.server.close()


@pytest.fixture
def tarpit() -> Iterator[Tarpit]:
    tarpit = Tarpit()
    yield tarpit
    tarpit.close()


@pytest.fixture
def sender(settings: Settings, session_factory: sessionmaker[Session]) -> WebhookSender:
    return WebhookSender(settings.model_copy(update={"webhook_poll_seconds": 0.05}), session_factory)


def register(client: TestClient, url: str, event_types: list[str] = ALL, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/webhook_endpoints", json={"url": url, "event_types": event_types, **body})
    assert response.status_code == 200, response.text
    endpoint: dict[str, Any] = response.json()
    return endpoint


def ended_job(factory: sessionmaker[Session], organization_id: str, status: JobStatus) -> str:
    """A job moved to `status` through `transition`, as the runner and the API move them."""
    path = {
        JobStatus.SUCCEEDED: [JobStatus.RUNNING, JobStatus.SUCCEEDED],
        JobStatus.FAILED: [JobStatus.FAILED],
        JobStatus.CANCELLED: [JobStatus.CANCELLED],
    }[status]
    with session_scope(factory) as session:
        job = JobRepository(session).add(
            Job(
                id=ids.job_id(),
                organization_id=organization_id,
                model="tiny-llama",
                training_file="file-x",
                status=JobStatus.QUEUED.value,
                method={"type": "supervised"},
                seed=0,
                result_files=[],
                created_at=int(time.time()),
                attempt=0,
            )
        )
        current = JobStatus.QUEUED
        for step in path:
            assert transition(session, job.id, from_=current, to=step)
            current = step
        return job.id


def deliveries(factory: sessionmaker[Session]) -> list[WebhookDelivery]:
    with session_scope(factory) as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.seq)))


def deliver_all(sender: WebhookSender, factory: sessionmaker[Session]) -> None:
    """Run the sender until no delivery is pending."""

    def finished() -> bool:
        sender.run_once()
        return all(d.status != "pending" for d in deliveries(factory))

    wait_for(finished, 30, "every delivery to finish")


def unwrap(request: tuple[dict[str, str], bytes], secret: str) -> object:
    """What a receiver written for OpenAI does with a delivery."""
    headers, body = request
    return openai.OpenAI(api_key="unused").webhooks.unwrap(body.decode(), headers, secret=secret)


def test_job_events_arrive_once_in_openai_shape_and_verify_with_the_openai_client(
    client: TestClient,
    tenant: Tenant,
    runner: JobRunner,  # noqa: F811
    registered_model: str,
    receiver: Receiver,
    sender: WebhookSender,
    session_factory: sessionmaker[Session],
) -> None:
    api = openai_client(client)
    endpoint = api.webhooks.create(url=receiver.url, event_types=ALL, name="ci")  # type: ignore[arg-type]
    assert endpoint.signing_secret.startswith("whsec_") and endpoint.event_types == ALL
    # One job fails in the runner, one is cancelled through the API, one succeeds as the runner ends a
    # run (its final `transition`; training is tests/test_runner.py's).
    succeeded = ended_job(session_factory, tenant.id, JobStatus.SUCCEEDED)
    failed = create_job(client, registered_model, b"not json\n")
    runner.run(failed)
    cancelled = create_job(client, registered_model, chat_lines(12))
    assert client.post(f"/v1/fine_tuning/jobs/{cancelled}/cancel").json()["status"] == "cancelled"
    assert client.get(f"/v1/fine_tuning/jobs/{failed}").json()["status"] == "failed"

    deliver_all(sender, session_factory)
    sender.run_once()  # nothing more is due: each event is sent once
    assert len(receiver.requests) == 3
    events = {event["data"]["id"]: event for event in receiver.events()}
    expected = {succeeded: ALL[0], failed: ALL[1], cancelled: ALL[2]}
    assert {job: event["type"] for job, event in events.items()} == expected
    for event in events.values():
        assert set(event) == {"id", "object", "created_at", "type", "data"} and event["object"] == "event"
        assert event["id"].startswith("evt_") and event["data"] == {"id": event["data"]["id"]}
        assert abs(event["created_at"] - time.time()) < 600
    types = {
        FineTuningJobSucceededWebhookEvent: succeeded,
        FineTuningJobFailedWebhookEvent: failed,
        FineTuningJobCancelledWebhookEvent: cancelled,
    }
    for request in receiver.requests:
        parsed = unwrap(request, endpoint.signing_secret)
        assert parsed.data.id == types[type(parsed)]  # type: ignore[attr-defined]
        with pytest.raises(openai.InvalidWebhookSignatureError):
            unwrap(request, "whsec_" + "A" * 44)
        headers, body = request
        with pytest.raises(openai.InvalidWebhookSignatureError):  # the body is what was signed
            unwrap((headers, body.replace(b"event", b"evil!")), endpoint.signing_secret)

    listed = client.get(f"/v1/webhook_endpoints/{endpoint.id}/deliveries").json()["data"]
    no_cursor = client.get(f"/v1/webhook_endpoints/{endpoint.id}/deliveries", params={"after": ""})
    assert no_cursor.json()["data"] == listed
    assert {(d["fine_tuning_job_id"], d["event_type"]) for d in listed} == set(expected.items())
    webhook_ids = {headers["webhook-id"] for headers, _ in receiver.requests}
    assert {d["id"] for d in listed} == webhook_ids
    for delivery in listed:
        assert delivery["status"] == "delivered" and delivery["attempts"] == 1
        assert delivery["last_status_code"] == 200 and delivery["last_response"] == "ok"
        assert delivery["next_attempt_at"] is None and delivery["last_error"] is None
        assert delivery["event_id"] == events[delivery["fine_tuning_job_id"]]["id"]


def test_a_failing_receiver_is_retried_with_growing_delays(
    client: TestClient,
    tenant: Tenant,
    receiver: Receiver,
    sender: WebhookSender,
    session_factory: sessionmaker[Session],
) -> None:
    endpoint = register(client, receiver.url)
    receiver.answers = [500, 500]
    ended_job(session_factory, tenant.id, JobStatus.CANCELLED)
    delays = []
    for attempt in (1, 2):
        assert sender.run_once() == 1
        (delivery,) = deliveries(session_factory)
        assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("pending", attempt, 500)
        assert delivery.next_attempt_at is not None and delivery.last_attempt_at is not None
        delays.append(delivery.next_attempt_at - delivery.last_attempt_at)
        due = delivery.next_attempt_at
        wait_for(lambda: time.time() > due, 5, "the retry to be due")  # noqa: B023
    # base·2^(n-1), less up to half: [0.5, 1]·BASE after the first failure, [1, 2]·BASE after the second
    # (give or take float rounding of unix times).
    assert BASE / 2 - EPS <= delays[0] <= BASE + EPS <= delays[1] + 2 * EPS <= 2 * BASE + 3 * EPS
    assert sender.run_once() == 1

    assert len(receiver.requests) == 3
    assert len({headers["webhook-id"] for headers, _ in receiver.requests}) == 1  # one delivery, retried
    assert len({body for _, body in receiver.requests}) == 1  # the same event each time
    timestamps = [int(headers["webhook-timestamp"]) for headers, _ in receiver.requests]
    assert timestamps == sorted(timestamps)  # each attempt signed when sent
    (shown,) = client.get(f"/v1/webhook_endpoints/{endpoint['id']}/deliveries").json()["data"]
    assert (shown["status"], shown["attempts"], shown["last_status_code"]) == ("delivered", 3, 200)


@pytest.mark.parametrize(
    ("limits", "attempts"),
    [({"webhook_max_attempts": 3}, 3), ({"webhook_max_age_seconds": BASE / 10}, 1)],
    ids=["max-attempts", "max-age"],
)
def test_a_receiver_that_never_succeeds_ends_failed(
    client: TestClient,
    tenant: Tenant,
    receiver: Receiver,
    settings: Settings,
    session_factory: sessionmaker[Session],
    limits: dict[str, float],
    attempts: int,
) -> None:
    endpoint = register(client, receiver.url)
    receiver.answers = [503] * 10
    ended_job(session_factory, tenant.id, JobStatus.FAILED)
    sender = WebhookSender(settings.model_copy(update=limits), session_factory)
    deliver_all(sender, session_factory)
    time.sleep(2 * BASE)
    assert sender.run_once() == 0
    assert len(receiver.requests) == attempts
    (shown,) = client.get(f"/v1/webhook_endpoints/{endpoint['id']}/deliveries").json()["data"]
    assert (shown["status"], shown["attempts"], shown["next_attempt_at"]) == ("failed", attempts, None)
    assert shown["last_status_code"] == 503
    assert (
        shown["last_response"].startswith("receiver broke: xxx")
        and len(shown["last_response"]) == SNIPPET_CHARS
    )


def test_events_reach_only_subscribed_endpoints_of_the_jobs_organisation(
    client: TestClient,
    tenant: Tenant,
    receiver: Receiver,
    sender: WebhookSender,
    session_factory: sessionmaker[Session],
) -> None:
    failures_only = register(client, receiver.url, ["fine_tuning.job.failed"])
    other = make_tenant(session_factory, "other-team")
    other_endpoint = client.post(
        "/v1/webhook_endpoints", json={"url": receiver.url + "/other"}, headers=other.headers
    ).json()
    assert other_endpoint["event_types"] == ALL  # the default
    ended_job(session_factory, tenant.id, JobStatus.CANCELLED)  # not subscribed
    ended_job(session_factory, tenant.id, JobStatus.SUCCEEDED)  # not subscribed
    failed = ended_job(session_factory, tenant.id, JobStatus.FAILED)
    stop = sender.start()  # as `ftjobs up`, `api` and `worker` run it
    try:
        wait_for(lambda: all(d.status == "delivered" for d in deliveries(session_factory)), 30, "delivery")
    finally:
        stop.set()
    assert [
        (headers["host"], event["data"]["id"])
        for (headers, _), event in zip(receiver.requests, receiver.events(), strict=True)
    ] == [(receiver.url.split("/")[2], failed)]
    assert [d.endpoint_id for d in deliveries(session_factory)] == [failures_only["id"]]
    theirs = client.get(f"/v1/webhook_endpoints/{other_endpoint['id']}/deliveries", headers=other.headers)
    assert theirs.json()["data"] == []


def test_the_event_is_written_with_the_status_change_or_not_at_all(
    client: TestClient, tenant: Tenant, receiver: Receiver, session_factory: sessionmaker[Session]
) -> None:
    register(client, receiver.url)
    job_id = ended_job(session_factory, tenant.id, JobStatus.FAILED)
    with session_factory() as session:  # a move that doesn't happen (the job has ended) writes nothing
        assert not transition(session, job_id, from_=JobStatus.RUNNING, to=JobStatus.CANCELLED)
        session.commit()
    assert len(deliveries(session_factory)) == 1
    running = ended_job(session_factory, tenant.id, JobStatus.SUCCEEDED)
    with session_factory() as session:
        session.execute(Job.__table__.update().where(Job.id == running).values(status="running"))
        assert transition(session, running, from_=JobStatus.RUNNING, to=JobStatus.CANCELLED)
        session.rollback()  # a crash before the commit: neither the status nor the event
    assert [d.event_type for d in deliveries(session_factory)] == ["fine_tuning.job.failed", ALL[0]]


def test_two_senders_on_postgres_deliver_each_event_once(
    client: TestClient,
    tenant: Tenant,
    receiver: Receiver,
    settings: Settings,
    session_factory: sessionmaker[Session],
    database_url: str,
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer: there is one sender per embedded process")
    register(client, receiver.url)
    register(client, receiver.url + "/second")
    jobs = [ended_job(session_factory, tenant.id, JobStatus.CANCELLED) for _ in range(12)]
    senders = [WebhookSender(settings, session_factory) for _ in range(2)]
    rounds: list[int] = []

    def drain(sender: WebhookSender) -> None:
        while done := sender.run_once():
            rounds.append(done)

    threads = [threading.Thread(target=drain, args=(sender,)) for sender in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    webhook_ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    assert len(webhook_ids) == len(set(webhook_ids)) == 2 * len(jobs) == sum(rounds)
    assert all(d.status == "delivered" and d.attempts == 1 for d in deliveries(session_factory))


def test_an_attempt_ends_at_its_deadline_however_slowly_the_receiver_answers(
    client: TestClient,
    tenant: Tenant,
    tarpit: Tarpit,
    settings: Settings,
    session_factory: sessionmaker[Session],
) -> None:
    register(client, tarpit.url)
    ended_job(session_factory, tenant.id, JobStatus.CANCELLED)
    sender = WebhookSender(settings.model_copy(update={"webhook_timeout_seconds": 1}), session_factory)
    started = time.monotonic()
    assert sender.run_once() == 1
    assert time.monotonic() - started < 2  # the tarpit would hold it for 15 s, 0.2 s a byte
    assert tarpit.requests == 1
    (delivery,) = deliveries(session_factory)
    assert (delivery.status, delivery.last_status_code) == ("pending", None)
    assert delivery.last_error == "Timed out: no complete answer within 1 s."


def test_one_organisations_slow_receivers_dont_delay_anothers_events(
    client: TestClient,
    tenant: Tenant,
    tarpit: Tarpit,
    receiver: Receiver,
    settings: Settings,
    session_factory: sessionmaker[Session],
) -> None:
    for _ in range(3):  # more places than one organisation may hold
        register(client, tarpit.url)
    for _ in range(4):
        ended_job(session_factory, tenant.id, JobStatus.FAILED)
    other = make_tenant(session_factory, "other-team")
    client.post("/v1/webhook_endpoints", json={"url": receiver.url}, headers=other.headers)
    theirs = ended_job(session_factory, other.id, JobStatus.SUCCEEDED)  # due after all of the above
    sender = WebhookSender(
        settings.model_copy(update={"webhook_timeout_seconds": 10, "webhook_poll_seconds": 0.05}),
        session_factory,
    )
    started = time.monotonic()
    stop = sender.start()
    try:
        wait_for(lambda: len(receiver.requests) == 1, 5, "the other organisation's event")
        assert time.monotonic() - started < 2
        assert [event["data"]["id"] for event in receiver.events()] == [theirs]
        assert 0 < tarpit.most_open <= PER_ORGANIZATION  # the tarpit's organisation held its share only
    finally:
        stop.set()
        tarpit.close()  # its attempts end now, before the database goes
        wait_for(lambda: not sender.endpoints_sending, 5, "the attempts in flight")


def test_a_failing_endpoint_is_backed_off_alone(
    client: TestClient,
    tenant: Tenant,
    receiver: Receiver,
    settings: Settings,
    session_factory: sessionmaker[Session],
) -> None:
    failing = register(client, receiver.url + "/failing")
    receiver.answers = [500, 500]
    for _ in range(4):
        ended_job(session_factory, tenant.id, JobStatus.FAILED)
    sender = WebhookSender(settings.model_copy(update={"webhook_retry_base_seconds": 60}), session_factory)
    assert sender.run_once() == PER_ENDPOINT  # its share of the places, both answered 500
    other = make_tenant(session_factory, "other-team")
    client.post("/v1/webhook_endpoints", json={"url": receiver.url}, headers=other.headers)
    theirs = ended_job(session_factory, other.id, JobStatus.SUCCEEDED)
    # The failing endpoint's two other deliveries are due, but it rests until its retry: only the other
    # organisation's event goes.
    assert sender.run_once() == 1
    assert receiver.events()[-1]["data"]["id"] == theirs
    waiting = [d for d in deliveries(session_factory) if d.endpoint_id == failing["id"] and d.attempts == 0]
    assert len(waiting) == 2 and all(d.status == "pending" for d in waiting)


def test_private_addresses_are_refused_unless_allowed(
    settings: Settings, tenant: Tenant, receiver: Receiver, session_factory: sessionmaker[Session]
) -> None:
    strict = settings.model_copy(update={"webhook_allow_private_urls": None})  # the default
    with TestClient(create_app(strict, RecordingDispatcher()), headers=tenant.headers) as client:
        for url in [
            receiver.url,
            "http://localhost:8080/hooks",
            "http://LOCALHOST./x",
            "http://hooks.localhost/x",
            "http://[::1]/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://[::127.0.0.1]/x",  # IPv4-compatible
            "http://[64:ff9b::7f00:1]/x",  # NAT64
            "http://[64:ff9b:1::a00:1]/x",  # local-use NAT64
            "http://[2002:7f00:1::]/x",  # 6to4
            "http://169.254.169.254/latest/meta-data",
            "http://10.1.2.3/x",
            "http://192.168.0.1/x",
            "http://0.0.0.0/x",
            "ftp://hooks.example.com/x",
            "https://user:password@hooks.example.com/x",
            "https://hooks.example.com:99999/x",
            "https://exa mple.com/x",
            "hooks.example.com/x",
            "https://hooks.example.com/" + "x" * 2048,
        ]:
            response = client.post("/v1/webhook_endpoints", json={"url": url})
            assert response.status_code == 400, (url, response.text)
            assert response.json()["error"]["param"] == "url", url
        for url in [
            "https://hooks.example.com/x",
            "http://93.184.215.14/x",
            "http://[64:ff9b::5db8:d70e]/x",  # NAT64 of a public address
            "http://[2002:5db8:d70e::]/x",
        ]:
            accepted = client.post("/v1/webhook_endpoints", json={"url": url})
            assert accepted.status_code == 200, accepted.text
            client.delete(f"/v1/webhook_endpoints/{accepted.json()['id']}")

    # A name is checked when it is sent to, whatever it resolved to when registered.
    with TestClient(create_app(settings, RecordingDispatcher()), headers=tenant.headers) as client:
        local = receiver.url.replace("127.0.0.1", "localhost")
        endpoint = register(client, local)
    ended_job(session_factory, tenant.id, JobStatus.CANCELLED)
    strict_sender = WebhookSender(strict, session_factory)
    assert strict_sender.run_once() == 1
    assert receiver.requests == []
    delivery = next(d for d in deliveries(session_factory) if d.endpoint_id == endpoint["id"])
    assert delivery.last_error is not None and "not a public address" in delivery.last_error
    assert delivery.last_status_code is None and delivery.status == "pending"


def test_endpoints_through_the_openai_client(
    client: TestClient,
    tenant: Tenant,
    receiver: Receiver,
    sender: WebhookSender,
    session_factory: sessionmaker[Session],
) -> None:
    api = openai_client(client)
    assert api.webhooks.event_types.list().data == ALL
    created = api.webhooks.create(url=receiver.url, event_types=ALL[:1], name="first")  # type: ignore[arg-type]
    assert created.signing_secret_hint == f"whsec_...{created.signing_secret[-4:]}"
    fetched = api.webhooks.retrieve(created.id)
    assert fetched.model_dump() == {k: v for k, v in created.model_dump().items() if k != "signing_secret"}
    assert "signing_secret" not in client.get(f"/v1/webhook_endpoints/{created.id}").json()
    others = [api.webhooks.create(url=receiver.url, event_types=ALL, name=f"n{i}") for i in range(2)]  # type: ignore[arg-type]
    first_page = api.webhooks.list(limit=2)
    assert [e.id for e in first_page.data] == [others[1].id, others[0].id] and first_page.has_more
    assert [e.id for e in api.webhooks.list(limit=2, after=others[0].id).data] == [created.id]
    no_cursor = client.get("/v1/webhook_endpoints", params={"after": ""}).json()["data"]
    assert [e["id"] for e in no_cursor] == [others[1].id, others[0].id, created.id]

    repeated = [*ALL, ALL[0]]  # kept once each, in the order given
    updated = api.webhooks.update(created.id, event_types=repeated, name="renamed")  # type: ignore[arg-type]
    assert (updated.name, updated.event_types, updated.url) == ("renamed", ALL, receiver.url)
    with pytest.raises(openai.BadRequestError):
        api.webhooks.update(created.id, url="http://[::1")
    with pytest.raises(openai.BadRequestError):
        api.webhooks.create(url=receiver.url, event_types=["batch.completed"], name="x")  # type: ignore[list-item]

    # A rotation that keeps the old secret: deliveries verify under either, for now.
    old = created.signing_secret
    rotated = api.webhooks.rotate_secret(created.id, keep_old_secret_active_for_24_hours=True)
    assert rotated.signing_secret != old
    for other in others:
        api.webhooks.delete(other.id)
    ended_job(session_factory, tenant.id, JobStatus.SUCCEEDED)
    deliver_all(sender, session_factory)
    (request,) = receiver.requests
    unwrap(request, old)
    unwrap(request, rotated.signing_secret)
    # One that doesn't: the old secret no longer verifies.
    newest = api.webhooks.rotate_secret(created.id)
    ended_job(session_factory, tenant.id, JobStatus.FAILED)
    deliver_all(sender, session_factory)
    unwrap(receiver.requests[1], newest.signing_secret)
    for stale in (old, rotated.signing_secret):
        with pytest.raises(openai.InvalidWebhookSignatureError):
            unwrap(receiver.requests[1], stale)

    deleted = api.webhooks.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "webhook_endpoint.deleted")
    with pytest.raises(openai.NotFoundError):
        api.webhooks.retrieve(created.id)
    assert deliveries(session_factory) == []  # its deliveries went with it
    assert client.get(f"/v1/webhook_endpoints/{created.id}/deliveries").status_code == 404


def test_an_organisation_has_at_most_20_endpoints(client: TestClient) -> None:
    for _ in range(20):
        register(client, "https://hooks.example.com/x")
    refused = client.post("/v1/webhook_endpoints", json={"url": "https://hooks.example.com/x"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "too_many_webhook_endpoints"
