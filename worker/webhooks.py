"""The webhook sender: delivers the outbox `models.webhooks` fills when jobs end.

The sender claims due deliveries for its free places (taking them for a lease, committed), sends each in
a pool thread with no transaction open, records its outcome, and claims more as places free: no delivery
waits for another. A 2xx is delivered; anything else is retried after an exponentially growing, jittered
delay until `webhook_max_attempts` or `webhook_max_age_seconds`, then failed. One tenant's receivers can't
hold up another's: each attempt ends by a deadline whatever the receiver does, an endpoint and an
organisation each have a bounded share of the places, and an endpoint whose attempt failed rests until
that delivery's retry is due. Every API and worker process runs one; concurrent senders skip each other's
rows, and a sender that dies mid-send only delays its rows to the end of their lease. Delivery is at least
once: receivers drop repeats by `webhook-id`.
"""

import logging
import random
import socket
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy.orm import Session, sessionmaker

from models.db import session_scope
from models.orm import WebhookEndpoint
from models.settings import Settings
from models.webhooks import (
    Claim,
    DeliveryStatus,
    UnsafeURL,
    WebhookRepository,
    event_body,
    safe_address,
    signature,
    signing_secrets,
)

log = logging.getLogger("ftjobs.webhooks")

CONCURRENCY = 8
"""Deliveries in flight per process."""
PER_ENDPOINT = 2
PER_ORGANIZATION = 4
"""The most of those one endpoint, and one organisation's endpoints, may hold: slow receivers of one
tenant leave the other places to everyone else."""
MAX_RETRY_DELAY = 3600.0
SNIPPET_CHARS = 256
"""What is kept of a response body (and of an error): enough to debug a receiver, no more."""
USER_AGENT = "ftjobs-webhooks/1"


@dataclass(frozen=True)
class Outcome:
    status_code: int | None = None
    response: str | None = None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookSender:
    def __init__(self, settings: Settings, session_factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.allow_private = bool(settings.webhook_allow_private_urls)
        # No proxies from the environment (the address check must be what is connected to), no redirects
        # (a 3xx is a failed attempt), no pooled connections (an address may serve several host names).
        self.http = httpx.Client(
            timeout=settings.webhook_timeout_seconds,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"user-agent": USER_AGENT, "accept-encoding": "identity"},
        )
        self.pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="ftjobs-webhook")
        self.lock = threading.Lock()
        self.endpoints_sending: Counter[str] = Counter()
        self.organizations_sending: Counter[str] = Counter()
        self.resting: dict[str, float] = {}
        """Endpoint id → when it may be sent to again, after a failed attempt."""
        self.freed = threading.Event()
        self.claiming = threading.Lock()

    @property
    def lease(self) -> float:
        """How long a claim holds a delivery: well past an attempt's deadline."""
        return 4 * self.settings.webhook_timeout_seconds + 30

    def run_once(self) -> int:
        """Claim what is due, send it and wait for it. The number of deliveries attempted."""
        started = self.start_due()
        wait(started)
        return len(started)

    def start_due(self) -> list[Future[None]]:
        """Claim due deliveries for the free places (within the endpoint and organisation shares) and start
        sending them; returns at once."""
        started = []
        with self.claiming:
            while claims := self._claim():
                started += [self.pool.submit(self._deliver, claim) for claim in claims]
        return started

    def _claim(self) -> list[Claim]:
        now = time.time()
        with self.lock:
            free = CONCURRENCY - self.endpoints_sending.total()
            self.resting = {endpoint: until for endpoint, until in self.resting.items() if until > now}
            endpoints, organizations = self.endpoints_sending.copy(), self.organizations_sending.copy()
            resting = set(self.resting)
        if free <= 0:
            return []
        skip_endpoints = {e for e, count in endpoints.items() if count >= PER_ENDPOINT} | resting
        skip_organizations = {o for o, count in organizations.items() if count >= PER_ORGANIZATION}

        def admit(endpoint: WebhookEndpoint) -> bool:
            """Whether the endpoint and its organisation have room for one more in this claim."""
            organization = endpoint.organization_id
            if endpoints[endpoint.id] >= PER_ENDPOINT or organizations[organization] >= PER_ORGANIZATION:
                return False
            endpoints[endpoint.id] += 1
            organizations[organization] += 1
            return True

        with session_scope(self.session_factory) as session:
            claims = WebhookRepository(session).claim(
                now,
                lease=self.lease,
                limit=free,
                skip_endpoints=skip_endpoints,
                skip_organizations=skip_organizations,
                admit=admit,
            )
        with self.lock:
            for claim in claims:
                self.endpoints_sending[claim.endpoint.id] += 1
                self.organizations_sending[claim.endpoint.organization_id] += 1
        return list(claims)

    def _deliver(self, claim: Claim) -> None:
        try:
            self._attempt(claim)
        except Exception:  # the database may be down: the lease brings the delivery back
            log.exception("webhook %s: the attempt or its record failed", claim.delivery.id)
        finally:
            with self.lock:
                for counts, owner in (
                    (self.endpoints_sending, claim.endpoint.id),
                    (self.organizations_sending, claim.endpoint.organization_id),
                ):
                    counts[owner] -= 1
                    if not counts[owner]:
                        del counts[owner]
            self.freed.set()

    def _attempt(self, claim: Claim) -> None:
        outcome = self.send(claim)
        delivery, now = claim.delivery, time.time()
        values: dict[str, object] = {
            "last_attempt_at": now,
            "last_status_code": outcome.status_code,
            "last_response": outcome.response,
            "last_error": outcome.error,
        }
        if outcome.delivered:
            values.update(status=DeliveryStatus.DELIVERED.value, next_attempt_at=None)
        else:
            retry_at = now + self.retry_delay(delivery.attempts)
            with self.lock:
                self.resting[claim.endpoint.id] = retry_at
            expired = retry_at - delivery.created_at > self.settings.webhook_max_age_seconds
            if delivery.attempts >= self.settings.webhook_max_attempts or expired:
                values.update(status=DeliveryStatus.FAILED.value, next_attempt_at=None)
            else:
                values.update(next_attempt_at=retry_at)
        with session_scope(self.session_factory) as session:
            WebhookRepository(session).record(delivery, **values)
        if not outcome.delivered:
            log.info(
                "webhook %s to %s: attempt %d failed: %s",
                delivery.id,
                delivery.endpoint_id,
                delivery.attempts,
                outcome.error or outcome.status_code,
            )

    def retry_delay(self, attempts: int) -> float:
        """After the n-th failed attempt: base·2^(n-1), capped at an hour, less up to half at random (so a
        receiver coming back up isn't hit by every retry at once; below the cap, each delay is still at
        least the one before)."""
        step = min(MAX_RETRY_DELAY, self.settings.webhook_retry_base_seconds * 2.0 ** min(attempts - 1, 64))
        return step * random.uniform(0.5, 1.0)

    def send(self, claim: Claim) -> Outcome:
        """One signed POST of the delivery's event to its endpoint's URL, connected to the address that
        passed the check, ended by the attempt's deadline."""
        delivery, endpoint = claim.delivery, claim.endpoint
        body = event_body(delivery)
        timestamp = int(time.time())
        url = httpx.URL(endpoint.url)
        host = url.raw_host.decode("ascii")
        deadline = _Deadline(self.settings.webhook_timeout_seconds)
        try:
            address = safe_address(
                host, url.port or (443 if url.scheme == "https" else 80), allow_private=self.allow_private
            )
            request = self.http.build_request(
                "POST",
                url.copy_with(host=address),
                content=body,
                headers={
                    "host": url.netloc.decode("ascii"),
                    "content-type": "application/json",
                    "webhook-id": delivery.id,
                    "webhook-timestamp": str(timestamp),
                    "webhook-signature": signature(
                        signing_secrets(endpoint, timestamp), delivery.id, timestamp, body
                    ),
                },
                # TLS checks the certificate against the name, not the address.
                extensions={"sni_hostname": host, "trace": deadline.trace},
            )
            with deadline:
                response = self.http.send(request, stream=True)
                try:
                    return Outcome(status_code=response.status_code, response=_snippet(response))
                finally:
                    response.close()
        except UnsafeURL as error:
            return Outcome(error=_clip(str(error)))
        except httpx.HTTPError as error:
            if deadline.passed:
                return Outcome(error=f"Timed out: no complete answer within {deadline.seconds:g} s.")
            return Outcome(error=_clip(f"{type(error).__name__}: {error}"))

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.freed.clear()  # before claiming: a place freed meanwhile wakes the wait below
            try:
                self.start_due()
            except Exception:  # the database may be down; the next round tries again
                log.exception("webhook sender round failed")
            self.freed.wait(self.settings.webhook_poll_seconds)
        self.pool.shutdown(wait=False)
        self.http.close()

    def start(self) -> threading.Event:
        """Send in a daemon thread until the returned event is set."""
        stop = threading.Event()
        threading.Thread(target=self.run_forever, args=(stop,), name="ftjobs-webhooks", daemon=True).start()
        return stop


class _Deadline:
    """Ends an attempt a fixed time after it starts, by shutting its socket down. httpx's timeouts are per
    operation: a receiver sending a byte now and then would hold an attempt for ever."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.passed = False
        self.socket: socket.socket | None = None
        self.lock = threading.Lock()
        self.timer = threading.Timer(seconds, self._cut)

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: learn the connection's socket as soon as it is connected."""
        if event == "connection.connect_tcp.complete":
            with self.lock:
                self.socket = info["return_value"].get_extra_info("socket")
                if self.passed:  # the deadline passed while connecting
                    self._shutdown()

    def __enter__(self) -> "_Deadline":
        self.timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.timer.cancel()

    def _cut(self) -> None:
        with self.lock:
            self.passed = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self.socket is not None:
            try:
                self.socket.shutdown(socket.SHUT_RDWR)  # a blocked read returns at once
            except OSError:
                pass  # already closed: the attempt ended on its own


def _snippet(response: httpx.Response) -> str | None:
    """The start of the body, read no further (a receiver may answer with anything, of any size)."""
    read = b""
    for chunk in response.iter_bytes():
        read += chunk
        if len(read) >= SNIPPET_CHARS:
            break
    return _clip(read.decode("utf-8", errors="replace")) or None


def _clip(text: str) -> str:
    # Postgres stores no NUL in text.
    return text.replace("\x00", "\ufffd")[:SNIPPET_CHARS]
