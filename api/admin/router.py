"""Extension: organisations, their storage quotas and their API keys, managed with the admin key (`ftjobs
keys` does the same from the server's shell)."""

import time

from fastapi import APIRouter
from sqlalchemy.orm import Session

from api.admin.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyObject,
    OrganizationCreate,
    OrganizationObject,
    OrganizationUpdate,
)
from api.deps import AdminDep, SessionDep, SettingsDep
from api.pagination import ListPage, list_page
from models.auth import ApiKeys, InvalidName, Organizations
from models.errors import APIError, not_found
from models.orm import Organization
from models.quota import StorageQuota
from models.scheduling import Usage
from models.settings import Settings

router = APIRouter(prefix="/v1/admin", tags=["admin"])

POLICY_FIELDS = frozenset({"share_weight", "device_caps", "monthly_device_hours"})
"""The scheduling policy's fields (docs/scheduling.md): for an organisation that does not exist, a 400."""


@router.post("/organizations")
def create_organization(
    body: OrganizationCreate, session: SessionDep, settings: SettingsDep, _: AdminDep
) -> OrganizationObject:
    try:
        organization = Organizations(session).create(body.name)
    except InvalidName as exc:
        raise APIError(str(exc), param="name", code="invalid_organization_name") from exc
    return _organization_object(session, settings, organization)


@router.get("/organizations")
def list_organizations(
    session: SessionDep, settings: SettingsDep, _: AdminDep
) -> ListPage[OrganizationObject]:
    organizations = Organizations(session).list()
    return list_page(organizations, False, lambda org: _organization_object(session, settings, org))


@router.get("/organizations/{organization_id}")
def retrieve_organization(
    organization_id: str, session: SessionDep, settings: SettingsDep, _: AdminDep
) -> OrganizationObject:
    """An organisation, with its storage use and limit."""
    return _organization_object(session, settings, _organization(session, organization_id))


@router.post("/organizations/{organization_id}")
def update_organization(
    organization_id: str, body: OrganizationUpdate, session: SessionDep, settings: SettingsDep, _: AdminDep
) -> OrganizationObject:
    """Set the organisation's storage limit and its scheduling policy (fair-share weight, devices in use
    per class, monthly device-hour budget); fields not given stay. Stored bytes over a lowered limit stay;
    new uploads and jobs' artifacts are refused until deletions bring the use under it."""
    given = body.model_fields_set
    if not given:
        raise APIError(
            "Give at least one of storage_quota_bytes, share_weight, device_caps, monthly_device_hours.",
            param="storage_quota_bytes",
        )
    policy = given & POLICY_FIELDS
    if policy and Organizations(session).get(organization_id) is None:
        raise APIError(
            f"No such organization: {organization_id!r}; a policy needs an existing organization.",
            param="organization_id",
        )
    organization = _organization(session, organization_id)
    for field in given:
        setattr(organization, field, getattr(body, field))
    return _organization_object(session, settings, organization)


@router.post("/organizations/{organization_id}/api_keys")
def create_api_key(
    organization_id: str, body: ApiKeyCreate, session: SessionDep, _: AdminDep
) -> ApiKeyCreated:
    """A new key for the organisation; its `value` is shown in this response only."""
    row, key = ApiKeys(session).create(_organization(session, organization_id), body.name)
    return ApiKeyCreated.model_validate({**ApiKeyObject.model_validate(row).model_dump(), "value": key})


@router.get("/organizations/{organization_id}/api_keys")
def list_api_keys(organization_id: str, session: SessionDep, _: AdminDep) -> ListPage[ApiKeyObject]:
    keys = ApiKeys(session).list(_organization(session, organization_id).id)
    return list_page(keys, False, ApiKeyObject.model_validate)


@router.delete("/api_keys/{key_id}")
def revoke_api_key(key_id: str, session: SessionDep, _: AdminDep) -> ApiKeyObject:
    """Revoke a key: its next request gets a 401. The key stays listed, with `revoked_at`."""
    keys = ApiKeys(session)
    key = keys.get(key_id)
    if key is None:
        raise not_found("API key", key_id, "key_id")
    keys.revoke(key)
    return ApiKeyObject.model_validate(key)


def _organization_object(
    session: Session, settings: Settings, organization: Organization
) -> OrganizationObject:
    usage = StorageQuota(session, settings.storage_quota_bytes).usage(organization.id)
    month = Usage(session).month_seconds([organization.id], now=time.time()).get(organization.id, 0.0)
    return OrganizationObject.model_validate(
        {
            **{column: getattr(organization, column) for column in ("id", "name", "created_at")},
            **{field: getattr(organization, field) for field in POLICY_FIELDS},
            "device_hours_this_month": round(month / 3600, 6),
            "storage_quota_bytes": organization.storage_quota_bytes,
            "storage_limit_bytes": usage.limit,
            "storage_used_bytes": usage.used,
        }
    )


def _organization(session: Session, organization_id: str) -> Organization:
    organization = Organizations(session).get(organization_id)
    if organization is None:
        raise not_found("organization", organization_id, "organization_id")
    return organization
