from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StringConstraints


class OrganizationCreate(BaseModel):
    name: str = Field(
        max_length=64, description="a-z, 0-9, '-' and '_'; the organisation segment of its models."
    )


class OrganizationObject(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["organization"] = "organization"
    name: str
    created_at: int
    storage_quota_bytes: int | None = Field(
        description="The organisation's own storage limit (0: none); null: the server's default applies."
    )
    storage_limit_bytes: int = Field(description="The storage limit in force (0: none).")
    storage_used_bytes: int = Field(
        description="Bytes its files, fine-tuned models and checkpoints hold in the artifact store."
    )
    share_weight: float = Field(description="Fair-share weight (docs/scheduling.md).")
    device_caps: dict[str, int] | None = Field(
        description="Most devices its running jobs may hold per device class (`*`: any other); null: none."
    )
    monthly_device_hours: float | None = Field(description="Monthly device-hour budget; null: none.")
    device_hours_this_month: float = Field(
        description="Device-hours used by the jobs it created this calendar month (UTC)."
    )


DeviceClassName = Annotated[str, StringConstraints(pattern=r"^(\*|[a-z0-9][a-z0-9._-]{0,63})$")]


class OrganizationUpdate(BaseModel):
    """Only the fields given change."""

    model_config = ConfigDict(extra="forbid")

    storage_quota_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Most bytes its files, fine-tuned models and checkpoints may hold (0: no limit); null: "
        "the server's default (FTJOBS_STORAGE_QUOTA_BYTES).",
    )
    share_weight: Annotated[float, Field(gt=0, le=1000)] = Field(
        default=1.0, description="Fair-share weight: its share of devices is proportional to it."
    )
    device_caps: dict[DeviceClassName, Annotated[int, Field(strict=True, ge=0, le=100_000)]] | None = Field(
        default=None, max_length=64, description="Most devices in use per class; `*` for every other."
    )
    monthly_device_hours: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="Device-hours its jobs may use per calendar month (UTC); null: no budget."
    )


class ApiKeyCreate(BaseModel):
    name: str = Field(default="", max_length=128, description="What the key is for.")


class ApiKeyObject(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["organization.api_key"] = "organization.api_key"
    name: str
    organization_id: str | None
    redacted_value: str = Field(validation_alias=AliasChoices("redacted", "redacted_value"))
    created_at: int
    last_used_at: int | None
    revoked_at: int | None


class ApiKeyCreated(ApiKeyObject):
    value: str = Field(description="The key itself: shown this once, never stored.")
