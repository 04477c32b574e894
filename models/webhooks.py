"""Webhooks: the endpoints an organisation registers, the outbox of job events for them, how a delivery is
signed, and which URLs may be sent to.

Events are OpenAI's: `fine_tuning.job.succeeded|failed|cancelled`, the body `{id, object: "event",
created_at, type, data: {id: <job id>}}`, signed as OpenAI signs them (the Standard Webhooks scheme):
`webhook-signature: v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">` under the
endpoint's `whsec_` secret. So a receiver written for OpenAI (`client.webhooks.unwrap(...)`) verifies ours.

A job's event is written by `enqueue_job_event` in the transaction that moves the job to its final status
(`models.states.transition`): both are committed or neither is. `worker.webhooks` sends the rows.
"""

import base64
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import socket
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, get_args

import httpx
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from models import ids
from models.orm import WebhookDelivery, WebhookEndpoint
from models.pagination import page

EventType = Literal["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
SECRET_PREFIX = "whsec_"
MAX_URL_LENGTH = 2048
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


def job_event_type(status: str) -> str:
    """`succeeded` → `fine_tuning.job.succeeded`."""
    return f"fine_tuning.job.{status}"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_hint(secret: str) -> str:
    """What listings show of a secret: enough to tell two apart, nothing to sign with."""
    return f"{SECRET_PREFIX}...{secret[-4:]}"


def signing_secrets(endpoint: WebhookEndpoint, now: float) -> list[str]:
    """The current secret, and the previous one while a rotation keeps it."""
    previous = endpoint.previous_secret
    expires = endpoint.previous_secret_expires_at or 0
    return [endpoint.secret] + ([previous] if previous and expires > now else [])


def signature(secrets_: Sequence[str], message_id: str, timestamp: int, body: bytes) -> str:
    """`webhook-signature`: one `v1,<base64>` per secret, space-separated (receivers accept any match)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()
        for secret in secrets_
    )


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def event_body(delivery: WebhookDelivery) -> bytes:
    event = {
        "id": delivery.event_id,
        "object": "event",
        "created_at": delivery.created_at,
        "type": delivery.event_type,
        "data": {"id": delivery.job_id},
    }
    return json.dumps(event, separators=(",", ":")).encode()


class UnsafeURL(ValueError):
    """A URL webhooks may not be sent to, and why."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast: not loopback, private, link-local (cloud metadata), shared or reserved.
    An IPv6 address that carries an IPv4 one is judged by it, as a NAT64 or 6to4 gateway forwards it."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL:
            return False  # a site's own NAT64 prefix: it reaches that site's IPv4 network
        embedded = address.ipv4_mapped or address.sixtofour  # ::ffff:127.0.0.1, 2002:7f00:1::
        if embedded is None and (address in _NAT64 or address in _IPV4_COMPATIBLE):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)  # 64:ff9b::7f00:1, ::127.0.0.1
        if embedded is not None:
            address = embedded
    return address.is_global and not address.is_multicast


_PRIVATE_HINT = "set FTJOBS_WEBHOOK_ALLOW_PRIVATE_URLS=true to allow private addresses"


def check_url(url: str, *, allow_private: bool) -> str:
    """The URL as stored, or UnsafeURL. A host given as an address (or `localhost`) is checked here; a name
    is checked each time it is sent to (`safe_address`), since what it resolves to can change."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeURL(f"The URL is longer than {MAX_URL_LENGTH} characters.")
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError) as error:
        raise UnsafeURL(f"Not a valid URL: {error}") from None
    if parsed.scheme not in ("http", "https"):
        raise UnsafeURL("The URL must start with https:// (or http://).")
    if parsed.userinfo:
        raise UnsafeURL(
            "The URL must not carry credentials: deliveries are authenticated by their signature."
        )
    if port is not None and not 1 <= port <= 65535:
        raise UnsafeURL(f"Invalid port {port}.")
    host = parsed.raw_host.decode("ascii").rstrip(".").lower()
    address = _address(host)
    if address is None and not all(_LABEL.match(label) for label in host.split(".")):
        raise UnsafeURL(f"Invalid host name {parsed.host!r}.")
    if not allow_private:
        if host == "localhost" or host.endswith(".localhost"):
            raise UnsafeURL(f"{host} is this machine; {_PRIVATE_HINT}.")
        if address is not None and not is_public(address):
            raise UnsafeURL(f"{address} is not a public address; {_PRIVATE_HINT}.")
    return url


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def safe_address(host: str, port: int, *, allow_private: bool) -> str:
    """The address to connect to for `host`: resolved now, and refused (UnsafeURL) if any address the name
    has is not public. The caller connects to this very address, so the name can't resolve elsewhere in
    between (DNS rebinding)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise UnsafeURL(f"Could not resolve {host}: {error}") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not allow_private:
        for address in addresses:
            if not is_public(address):
                raise UnsafeURL(
                    f"Refused: {host} resolves to {address}, not a public address; {_PRIVATE_HINT}."
                )
    return str(addresses[0])


@dataclass(frozen=True)
class Claim:
    """A delivery a sender holds until `next_attempt_at`, and its endpoint."""

    delivery: WebhookDelivery
    endpoint: WebhookEndpoint


class WebhookRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    # Endpoints: every query takes the organisation.

    def add(self, endpoint: WebhookEndpoint) -> WebhookEndpoint:
        self.session.add(endpoint)
        self.session.flush()
        return endpoint

    def get(self, organization_id: str, endpoint_id: str) -> WebhookEndpoint | None:
        return self.session.scalar(
            select(WebhookEndpoint).where(
                WebhookEndpoint.organization_id == organization_id, WebhookEndpoint.id == endpoint_id
            )
        )

    def list(
        self, organization_id: str, *, after: WebhookEndpoint | None, limit: int
    ) -> tuple[Sequence[WebhookEndpoint], bool]:
        stmt = select(WebhookEndpoint).where(WebhookEndpoint.organization_id == organization_id)
        return page(
            self.session, stmt, WebhookEndpoint.seq, after_seq=after.seq if after else None, limit=limit
        )

    def count(self, organization_id: str) -> int:
        stmt = select(func.count()).where(WebhookEndpoint.organization_id == organization_id)
        return self.session.scalar(stmt) or 0

    def delete(self, endpoint: WebhookEndpoint) -> None:
        """The endpoint and its deliveries: nothing more is sent to it."""
        self.session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id))
        self.session.delete(endpoint)
        self.session.flush()

    # Deliveries.

    def enqueue_job_event(
        self, organization_id: str, job_id: str, event_type: str
    ) -> Sequence[WebhookDelivery]:
        """The outbox write: one event, one delivery per endpoint of the organisation subscribed to it."""
        endpoints = self.session.scalars(
            select(WebhookEndpoint).where(WebhookEndpoint.organization_id == organization_id)
        )
        now = time.time()
        event_id = ids.random_id("evt_")
        deliveries = [
            WebhookDelivery(
                id=ids.random_id("wh_"),
                endpoint_id=endpoint.id,
                event_id=event_id,
                event_type=event_type,
                job_id=job_id,
                created_at=int(now),
                status=DeliveryStatus.PENDING.value,
                attempts=0,
                next_attempt_at=now,
            )
            for endpoint in endpoints
            if event_type in endpoint.event_types
        ]
        self.session.add_all(deliveries)
        return deliveries

    def get_delivery(self, endpoint_id: str, delivery_id: str) -> WebhookDelivery | None:
        return self.session.scalar(
            select(WebhookDelivery).where(
                WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.id == delivery_id
            )
        )

    def list_deliveries(
        self, endpoint_id: str, *, after: WebhookDelivery | None, limit: int
    ) -> tuple[Sequence[WebhookDelivery], bool]:
        stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
        return page(
            self.session, stmt, WebhookDelivery.seq, after_seq=after.seq if after else None, limit=limit
        )

    def claim(
        self,
        now: float,
        *,
        lease: float,
        limit: int,
        skip_endpoints: Collection[str] = (),
        skip_organizations: Collection[str] = (),
        admit: Callable[[WebhookEndpoint], bool] = lambda _: True,
    ) -> Sequence[Claim]:
        """Up to `limit` due deliveries, oldest first, taken for `lease` seconds (counted as an attempt now,
        so a sender that dies mid-send still uses one up). The sender's bounds: none of the skipped
        endpoints' or organisations', and only those `admit` takes a place for. Concurrent senders skip
        each other's rows (Postgres's SKIP LOCKED; SQLite has one writer at a time)."""
        due = (WebhookDelivery.status == DeliveryStatus.PENDING.value) & (
            WebhookDelivery.next_attempt_at <= now
        )
        if self.session.scalar(select(WebhookDelivery.id).where(due).limit(1)) is None:
            return []  # the common case, and no write lock taken for it
        # A few times `limit`, so that one endpoint's backlog doesn't fill the batch; skipping the full
        # endpoints and organisations in SQL keeps a big backlog of theirs from hiding everyone else's.
        rows = self.session.execute(
            select(WebhookDelivery.id, WebhookEndpoint)
            .outerjoin(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(
                due,
                WebhookDelivery.endpoint_id.not_in(list(skip_endpoints)),
                WebhookEndpoint.organization_id.not_in(list(skip_organizations))
                | WebhookEndpoint.id.is_(None),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(4 * limit)
            .with_for_update(skip_locked=True, of=WebhookDelivery)
        ).all()
        # An endpoint deleted while its job was finishing: its late delivery goes with it.
        orphans = [delivery_id for delivery_id, endpoint in rows if endpoint is None]
        if orphans:
            self.session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(orphans)))
        chosen: dict[str, WebhookEndpoint] = {}
        for delivery_id, endpoint in rows:
            if len(chosen) < limit and endpoint is not None and admit(endpoint):
                chosen[delivery_id] = endpoint
        if not chosen:
            return []
        claimed = self.session.scalars(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(list(chosen)), due)  # `due` again: a row another claim moved
            .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=now + lease)
            .returning(WebhookDelivery),
            execution_options={"synchronize_session": False},
        ).all()
        return [Claim(delivery, chosen[delivery.id]) for delivery in claimed]

    def record(self, delivery: WebhookDelivery, **values: object) -> bool:
        """Write an attempt's outcome, unless the delivery was claimed again since (its lease ran out)."""
        result = self.session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery.id,
                WebhookDelivery.attempts == delivery.attempts,
                WebhookDelivery.status == DeliveryStatus.PENDING.value,
            )
            .values(**values),
            execution_options={"synchronize_session": False},
        )
        return result.rowcount == 1  # type: ignore[attr-defined]
