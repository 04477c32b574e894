"""OpenAI's webhook endpoint routes (`client.webhooks.create|retrieve|update|list|delete|rotate_secret`,
`client.webhooks.event_types.list`), for the fine-tuning events, and each endpoint's deliveries (an
extension)."""

from typing import Annotated, Any

from fastapi import APIRouter

from api.deps import OrgDep, SessionDep, SettingsDep
from api.idempotency import IdempotencyDep
from api.pagination import After, Limit, ListPage, list_page
from api.webhooks import service
from api.webhooks.schemas import (
    RotateSecret,
    WebhookDeliveryObject,
    WebhookEndpointCreate,
    WebhookEndpointDeleted,
    WebhookEndpointObject,
    WebhookEndpointUpdate,
    WebhookEndpointWithSecret,
    WebhookEventTypes,
)
from models.webhooks import EVENT_TYPES

router = APIRouter(prefix="/v1", tags=["webhooks"])
ENDPOINT = "/webhook_endpoints/{webhook_endpoint_id}"
SHOWN_ONCE = ["signing_secret"]
"""Null in an Idempotency-Key's replay: the secret is shown once, and stored only to sign."""


@router.get("/webhook_event_types")
def list_event_types(_: OrgDep) -> WebhookEventTypes:
    """The events ftjobs sends."""
    return WebhookEventTypes(data=list(EVENT_TYPES))


@router.post("/webhook_endpoints", response_model=WebhookEndpointWithSecret)
def create_endpoint(
    body: WebhookEndpointCreate,
    session: SessionDep,
    settings: SettingsDep,
    org: OrgDep,
    idempotency: IdempotencyDep,
) -> Any:
    """Register a URL for job events; the signing secret is in this response only (not in a replay)."""
    return idempotency.run(
        lambda: body.model_dump_json().encode(),
        lambda: WebhookEndpointWithSecret.of(service.create(session, settings, org, body)),
        shown_once=SHOWN_ONCE,
    )


@router.get("/webhook_endpoints")
def list_endpoints(
    session: SessionDep, org: OrgDep, after: After = None, limit: Annotated[int, Limit(100)] = 20
) -> ListPage[WebhookEndpointObject]:
    """The organisation's webhook endpoints, newest first."""
    rows, has_more = service.list_endpoints(session, org, after=after, limit=limit)
    return list_page(rows, has_more, WebhookEndpointObject.of)


@router.get(ENDPOINT)
def retrieve_endpoint(webhook_endpoint_id: str, session: SessionDep, org: OrgDep) -> WebhookEndpointObject:
    """Retrieve a webhook endpoint."""
    return WebhookEndpointObject.of(service.get(session, org, webhook_endpoint_id))


@router.post(ENDPOINT)
def update_endpoint(
    webhook_endpoint_id: str,
    body: WebhookEndpointUpdate,
    session: SessionDep,
    settings: SettingsDep,
    org: OrgDep,
) -> WebhookEndpointObject:
    """Change an endpoint's URL, events or name."""
    return WebhookEndpointObject.of(service.update(session, settings, org, webhook_endpoint_id, body))


@router.delete(ENDPOINT)
def delete_endpoint(webhook_endpoint_id: str, session: SessionDep, org: OrgDep) -> WebhookEndpointDeleted:
    """Delete an endpoint; its pending deliveries are dropped."""
    service.delete(session, org, webhook_endpoint_id)
    return WebhookEndpointDeleted(id=webhook_endpoint_id, deleted=True)


@router.post(f"{ENDPOINT}/rotate_secret", response_model=WebhookEndpointWithSecret)
def rotate_secret(
    webhook_endpoint_id: str,
    session: SessionDep,
    org: OrgDep,
    idempotency: IdempotencyDep,
    body: RotateSecret | None = None,
) -> Any:
    """A new signing secret, shown in this response only (not in a replay); the old one signs too for 24
    hours if asked."""
    keep_old = body is not None and body.keep_old_secret_active_for_24_hours
    return idempotency.run(
        lambda: str(keep_old).encode(),
        lambda: WebhookEndpointWithSecret.of(
            service.rotate_secret(session, org, webhook_endpoint_id, keep_old)
        ),
        shown_once=SHOWN_ONCE,
    )


@router.get(f"{ENDPOINT}/deliveries")
def list_deliveries(
    webhook_endpoint_id: str,
    session: SessionDep,
    org: OrgDep,
    after: After = None,
    limit: Annotated[int, Limit(100)] = 20,
) -> ListPage[WebhookDeliveryObject]:
    """Extension: the endpoint's deliveries, newest first, with their attempts and last outcome."""
    rows, has_more = service.list_deliveries(session, org, webhook_endpoint_id, after=after, limit=limit)
    return list_page(rows, has_more, WebhookDeliveryObject.of)
