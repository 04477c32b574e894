from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


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


class OrganizationUpdate(BaseModel):
    storage_quota_bytes: int | None = Field(
        ge=0,
        description="Most bytes its files, fine-tuned models and checkpoints may hold (0: no limit); null: "
        "the server's default (FTJOBS_STORAGE_QUOTA_BYTES).",
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
