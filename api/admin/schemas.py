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
