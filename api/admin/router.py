"""Extension: organisations and their API keys, managed with the admin key (`ftjobs keys` does the same
from the server's shell)."""

from fastapi import APIRouter
from sqlalchemy.orm import Session

from api.admin.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyObject,
    OrganizationCreate,
    OrganizationObject,
)
from api.deps import AdminDep, SessionDep
from api.pagination import ListPage, list_page
from models.auth import ApiKeys, InvalidName, Organizations
from models.errors import APIError, not_found
from models.orm import Organization

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post("/organizations")
def create_organization(body: OrganizationCreate, session: SessionDep, _: AdminDep) -> OrganizationObject:
    try:
        organization = Organizations(session).create(body.name)
    except InvalidName as exc:
        raise APIError(str(exc), param="name", code="invalid_organization_name") from exc
    return OrganizationObject.model_validate(organization)


@router.get("/organizations")
def list_organizations(session: SessionDep, _: AdminDep) -> ListPage[OrganizationObject]:
    return list_page(Organizations(session).list(), False, OrganizationObject.model_validate)


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


def _organization(session: Session, organization_id: str) -> Organization:
    organization = Organizations(session).get(organization_id)
    if organization is None:
        raise not_found("organization", organization_id, "organization_id")
    return organization
