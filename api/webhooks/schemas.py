"""Webhook endpoint shapes, field for field as OpenAI's (what `client.webhooks` sends and parses), and the
deliveries list, our extension."""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from models.orm import WebhookDelivery, WebhookEndpoint
from models.webhooks import EVENT_TYPES, MAX_URL_LENGTH, EventType, secret_hint

Url = Annotated[str, Field(min_length=1, max_length=MAX_URL_LENGTH, description="Where events are POSTed.")]
EventTypes = Annotated[
    list[EventType],
    Field(min_length=1, max_length=16, description="The events sent to the endpoint."),
    AfterValidator(lambda types: list(dict.fromkeys(types))),  # each once, in the order given
]
Name = Annotated[str, Field(max_length=256, description="A label for people.")]


class WebhookEndpointCreate(BaseModel):
    """OpenAI's body; `event_types` defaults to every fine-tuning event and `name` to "" (both required
    there)."""

    model_config = ConfigDict(extra="forbid")
    url: Url
    event_types: EventTypes = Field(default_factory=lambda: list(EVENT_TYPES))
    name: Name = ""


class WebhookEndpointUpdate(BaseModel):
    """Only what is given changes."""

    model_config = ConfigDict(extra="forbid")
    url: Url | None = None
    event_types: EventTypes | None = None
    name: Name | None = None


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_old_secret_active_for_24_hours: bool = False
    """Sign with both secrets for 24 hours (receivers accept either), so receivers can switch over."""


class WebhookEndpointObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    created_at: int
    updated_at: int
    event_types: list[str]
    name: str
    url: str
    signing_secret_hint: str

    @classmethod
    def of(cls, endpoint: WebhookEndpoint) -> "WebhookEndpointObject":
        return WebhookEndpointObject(
            id=endpoint.id,
            created_at=endpoint.created_at,
            updated_at=endpoint.updated_at,
            event_types=endpoint.event_types,
            name=endpoint.name,
            url=endpoint.url,
            signing_secret_hint=secret_hint(endpoint.secret),
        )


class WebhookEndpointWithSecret(WebhookEndpointObject):
    """Only when the endpoint is created or its secret rotated: the secret is not shown again."""

    signing_secret: str | None
    """Null in an Idempotency-Key replay: the secret is shown once, and not kept with the key."""

    @classmethod
    def of(cls, endpoint: WebhookEndpoint) -> "WebhookEndpointWithSecret":
        return cls(**WebhookEndpointObject.of(endpoint).model_dump(), signing_secret=endpoint.secret)


class WebhookEndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool


class WebhookEventTypes(BaseModel):
    object: Literal["list"] = "list"
    data: list[str]


class WebhookDeliveryObject(BaseModel):
    """Extension: one event for one endpoint, and how sending it went."""

    id: str
    """The `webhook-id` header: the same on every attempt."""
    object: Literal["webhook_endpoint.delivery"] = "webhook_endpoint.delivery"
    webhook_endpoint_id: str
    event_id: str
    event_type: str
    fine_tuning_job_id: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    created_at: int
    last_attempt_at: int | None
    next_attempt_at: int | None
    """When the next attempt is due, while pending."""
    last_status_code: int | None
    last_response: str | None
    """The start of the last response's body."""
    last_error: str | None
    """Why the last attempt got no response (refused address, DNS, connection, timeout)."""

    @classmethod
    def of(cls, delivery: WebhookDelivery) -> "WebhookDeliveryObject":
        def seconds(value: float | None) -> int | None:
            return None if value is None else int(value)

        return cls(
            id=delivery.id,
            webhook_endpoint_id=delivery.endpoint_id,
            event_id=delivery.event_id,
            event_type=delivery.event_type,
            fine_tuning_job_id=delivery.job_id,
            status=delivery.status,  # type: ignore[arg-type]
            attempts=delivery.attempts,
            created_at=delivery.created_at,
            last_attempt_at=seconds(delivery.last_attempt_at),
            next_attempt_at=seconds(delivery.next_attempt_at),
            last_status_code=delivery.last_status_code,
            last_response=delivery.last_response,
            last_error=delivery.last_error,
        )
