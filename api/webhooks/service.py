"""Webhook endpoint rules: which URLs may be registered, how many, and what each change does."""

import time
from collections.abc import Sequence

from sqlalchemy.orm import Session

from api.pagination import cursor
from api.webhooks.schemas import WebhookEndpointCreate, WebhookEndpointUpdate
from models import ids
from models.auth import Organizations
from models.errors import APIError, not_found
from models.orm import WebhookDelivery, WebhookEndpoint
from models.settings import Settings
from models.webhooks import UnsafeURL, WebhookRepository, check_url, new_secret

MAX_ENDPOINTS = 20
"""Per organisation: each job's end is one delivery per subscribed endpoint."""
KEEP_OLD_SECRET_SECONDS = 24 * 3600


def _url(settings: Settings, url: str) -> str:
    try:
        return check_url(url, allow_private=bool(settings.webhook_allow_private_urls))
    except UnsafeURL as error:
        raise APIError(str(error), param="url", code="invalid_url") from None


def create(
    session: Session, settings: Settings, organization_id: str, body: WebhookEndpointCreate
) -> WebhookEndpoint:
    url = _url(settings, body.url)
    repo = WebhookRepository(session)
    Organizations(session).lock(organization_id)  # two creates can't both take the last free place
    if repo.count(organization_id) >= MAX_ENDPOINTS:
        raise APIError(
            f"Your organization has {MAX_ENDPOINTS} webhook endpoints, the most it may have; "
            "delete one first.",
            code="too_many_webhook_endpoints",
        )
    now = int(time.time())
    return repo.add(
        WebhookEndpoint(
            id=ids.random_id("whep_"),
            organization_id=organization_id,
            url=url,
            name=body.name,
            event_types=body.event_types,
            secret=new_secret(),
            created_at=now,
            updated_at=now,
        )
    )


def get(session: Session, organization_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = WebhookRepository(session).get(organization_id, endpoint_id)
    if endpoint is None:
        raise not_found("webhook endpoint", endpoint_id, "webhook_endpoint_id")
    return endpoint


def list_endpoints(
    session: Session, organization_id: str, *, after: str | None, limit: int
) -> tuple[Sequence[WebhookEndpoint], bool]:
    repo = WebhookRepository(session)
    start = cursor(after, lambda endpoint_id: repo.get(organization_id, endpoint_id), "webhook endpoint")
    return repo.list(organization_id, after=start, limit=limit)


def update(
    session: Session, settings: Settings, organization_id: str, endpoint_id: str, body: WebhookEndpointUpdate
) -> WebhookEndpoint:
    """New settings apply to deliveries not yet made, pending retries included."""
    endpoint = get(session, organization_id, endpoint_id)
    changes = {
        "url": None if body.url is None else _url(settings, body.url),
        "name": body.name,
        "event_types": body.event_types,
    }
    changed = False
    for field, value in changes.items():
        if value is not None and value != getattr(endpoint, field):
            setattr(endpoint, field, value)
            changed = True
    if changed:
        endpoint.updated_at = int(time.time())
    session.flush()
    return endpoint


def delete(session: Session, organization_id: str, endpoint_id: str) -> None:
    WebhookRepository(session).delete(get(session, organization_id, endpoint_id))


def rotate_secret(
    session: Session, organization_id: str, endpoint_id: str, keep_old: bool
) -> WebhookEndpoint:
    endpoint = get(session, organization_id, endpoint_id)
    now = int(time.time())
    endpoint.previous_secret = endpoint.secret if keep_old else None
    endpoint.previous_secret_expires_at = now + KEEP_OLD_SECRET_SECONDS if keep_old else None
    endpoint.secret = new_secret()
    endpoint.updated_at = now
    session.flush()
    return endpoint


def list_deliveries(
    session: Session, organization_id: str, endpoint_id: str, *, after: str | None, limit: int
) -> tuple[Sequence[WebhookDelivery], bool]:
    endpoint = get(session, organization_id, endpoint_id)
    repo = WebhookRepository(session)
    start = cursor(after, lambda delivery_id: repo.get_delivery(endpoint.id, delivery_id), "webhook delivery")
    return repo.list_deliveries(endpoint.id, after=start, limit=limit)
