"""The webhook sender: delivers the outbox `models.webhooks` fills when jobs end.

Each round claims the due deliveries (taking them for a lease, committed), sends them with no transaction
open, then records each outcome: a 2xx is delivered; anything else is retried after an exponentially
growing, jittered delay until `webhook_max_attempts` or `webhook_max_age_seconds`, then failed. Every API
and worker process runs one; concurrent senders skip each other's rows, and a sender that dies mid-send
only delays its rows to the end of their lease. Delivery is at least once: receivers drop repeats by
`webhook-id`.
"""

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from sqlalchemy.orm import Session, sessionmaker

from models.db import session_scope
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
"""Deliveries in flight per process, so one slow receiver doesn't hold up the others."""
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

    @property
    def lease(self) -> float:
        """How long a claim holds a delivery: well past the slowest attempt (connect, send, first read)."""
        return 4 * self.settings.webhook_timeout_seconds + 30

    def run_once(self) -> int:
        """One round: claim, send, record. The number of deliveries attempted."""
        with session_scope(self.session_factory) as session:
            claimed = WebhookRepository(session).claim(time.time(), limit=CONCURRENCY, lease=self.lease)
        list(self.pool.map(self._deliver, claimed))
        return len(claimed)

    def _deliver(self, claim: Claim) -> None:
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
        passed the check."""
        delivery, endpoint = claim.delivery, claim.endpoint
        body = event_body(delivery)
        timestamp = int(time.time())
        url = httpx.URL(endpoint.url)
        host = url.raw_host.decode("ascii")
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
                extensions={"sni_hostname": host},
            )
            response = self.http.send(request, stream=True)
            try:
                return Outcome(status_code=response.status_code, response=_snippet(response))
            finally:
                response.close()
        except UnsafeURL as error:
            return Outcome(error=_clip(str(error)))
        except httpx.HTTPError as error:
            return Outcome(error=_clip(f"{type(error).__name__}: {error}"))

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.webhook_poll_seconds):
            try:
                while self.run_once() and not stop.is_set():
                    pass  # a full round: more may be due at once
            except Exception:  # the database may be down; the next round tries again
                log.exception("webhook sender round failed")
        self.pool.shutdown(wait=False)
        self.http.close()

    def start(self) -> threading.Event:
        """Send in a daemon thread until the returned event is set."""
        stop = threading.Event()
        threading.Thread(target=self.run_forever, args=(stop,), name="ftjobs-webhooks", daemon=True).start()
        return stop


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
