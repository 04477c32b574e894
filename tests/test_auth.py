"""API keys: Bearer authentication on every /v1 route, keys stored only as hashes, revocation, the admin
key (long and random, or refused at start) and its routes, the per-key rate limit (in memory and shared
through Redis), and the per-address limit on failed authentications."""

import hashlib
import re
import secrets
from collections.abc import Iterator

import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from api.main import create_app
from cli.main import app as cli_app
from models.auth import ApiKeys
from models.db import session_scope
from models.orm import ApiKey
from models.settings import Settings
from tests.conftest import RecordingDispatcher, Tenant, make_tenant
from tests.test_api_files import LINE, assert_error, upload

ADMIN = "an-admin-key-from-the-environment-Xq7Lp2Vz9K"


def protected_routes(client: TestClient) -> list[tuple[str, str]]:
    """Every /v1 operation in the app's OpenAPI schema, its path parameters filled with made-up ids."""
    paths = client.get("/openapi.json").json()["paths"]
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "x", path))
        for path, operations in paths.items()
        if path.startswith("/v1/")
        for method in operations
    ]


@pytest.fixture
def client(settings: Settings, tenant: Tenant) -> Iterator[TestClient]:
    """The conftest's, without the limit on failed authentications: these tests fail hundreds."""
    unlimited = settings.model_copy(update={"auth_failures_per_minute": 0})
    with TestClient(create_app(unlimited, RecordingDispatcher()), headers=tenant.headers) as client:
        yield client


def test_every_route_refuses_a_missing_malformed_unknown_or_revoked_key(
    client: TestClient, session_factory: sessionmaker[Session], tenant: Tenant
) -> None:
    routes = protected_routes(client)
    assert (
        len(routes) > 20 and ("POST", "/v1/files") in routes and ("GET", "/v1/admin/organizations") in routes
    )
    with session_scope(session_factory) as session:
        revoked = ApiKeys(session).get(tenant.key.removeprefix("sk-ftj-").split("-")[0])
        assert revoked is not None
        ApiKeys(session).revoke(revoked)
    unknown = "sk-ftj-AAAAAAAAAAAA-" + "x" * 43
    for headers in (
        {"Authorization": ""},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": f"Bearer {unknown}"},
        {"Authorization": f"Bearer {tenant.key}x"},
        tenant.headers,  # revoked above
    ):
        for method, path in routes:
            response = client.request(method, path, headers=headers)
            error = assert_error(response, 401, code="invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
            assert tenant.key not in error["message"]
    assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200


def test_an_upload_without_a_key_is_refused_before_its_body_is_read(client: TestClient) -> None:
    read = []

    def body() -> Iterator[bytes]:
        read.append(1)
        yield b"--x\r\n"

    response = client.post(
        "/v1/files",
        content=body(),
        headers={"Authorization": "", "content-type": "multipart/form-data; boundary=x"},
    )
    assert_error(response, 401, code="invalid_api_key")
    assert read == []


def test_keys_are_stored_as_hashes_and_a_revoked_key_fails_its_next_request(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    app = create_app(settings.model_copy(update={"admin_key": SecretStr(ADMIN)}), RecordingDispatcher())
    with TestClient(app, raise_server_exceptions=False) as admin:
        admin.headers["Authorization"] = f"Bearer {ADMIN}"
        org = admin.post("/v1/admin/organizations", json={"name": "acme"}).json()
        assert org["object"] == "organization" and org["id"].startswith("org-")
        created = admin.post(f"/v1/admin/organizations/{org['id']}/api_keys", json={"name": "ci"}).json()
        key = created["value"]
        assert key.startswith("sk-ftj-") and created["organization_id"] == org["id"]

        with session_scope(session_factory) as session:
            row = session.scalars(select(ApiKey).where(ApiKey.id == created["id"])).one()
            stored = [str(getattr(row, column.key)) for column in ApiKey.__table__.columns]
            secret = key.removeprefix(f"sk-ftj-{created['id']}-")  # the listing shows its last 4 chars
            assert len(secret) == 43 and secret[:-4] not in " ".join(stored)
            assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
        listed = admin.get(f"/v1/admin/organizations/{org['id']}/api_keys").json()["data"]
        assert [k["id"] for k in listed] == [created["id"]] and "value" not in listed[0]
        assert listed[0]["redacted_value"] == created["redacted_value"] and key not in str(listed)

        user = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=admin, max_retries=0)
        assert user.files.create(file=("a.jsonl", LINE.encode()), purpose="fine-tune").id
        with session_scope(session_factory) as session:
            assert session.get(ApiKey, created["id"]).last_used_at is not None  # type: ignore[union-attr]

        revoked = admin.delete(f"/v1/admin/api_keys/{created['id']}").json()
        assert revoked["revoked_at"] is not None
        with pytest.raises(openai.AuthenticationError) as refused:
            user.files.list()
        assert refused.value.code == "invalid_api_key"


def test_the_admin_key_manages_organisations_and_nothing_else(
    settings: Settings, session_factory: sessionmaker[Session], tenant: Tenant
) -> None:
    with session_scope(session_factory) as session:
        generated = ApiKeys(session).ensure_admin_key()
        assert generated is not None and generated.startswith("sk-ftjadmin-")
        assert ApiKeys(session).ensure_admin_key() is None  # shown once: not again while it is valid
    with TestClient(create_app(settings, RecordingDispatcher()), raise_server_exceptions=False) as client:
        admin = {"Authorization": f"Bearer {generated}"}
        names = [o["name"] for o in client.get("/v1/admin/organizations", headers=admin).json()["data"]]
        assert names == [tenant.name]
        for body, code in (({"name": "Has Caps"}, "invalid_organization_name"), ({"name": "local"}, None)):
            assert_error(client.post("/v1/admin/organizations", json=body, headers=admin), 400, "name", code)
        assert_error(
            client.get("/v1/admin/organizations/org-nope/api_keys", headers=admin), 404, "organization_id"
        )
        assert_error(client.delete("/v1/admin/api_keys/nope", headers=admin), 404, "key_id")
        # Each key to its own routes: an organisation's key can't administer, the admin key owns no files.
        assert_error(
            client.get("/v1/admin/organizations", headers=tenant.headers), 403, code="permission_denied"
        )
        assert_error(client.get("/v1/files", headers=admin), 403, code="permission_denied")


def test_requests_over_the_per_key_limit_get_429_with_retry_after(
    settings: Settings, session_factory: sessionmaker[Session], tenant: Tenant
) -> None:
    limited = settings.model_copy(update={"rate_limit_per_minute": 3})
    other = make_tenant(session_factory, "other")
    with TestClient(create_app(limited, RecordingDispatcher()), headers=tenant.headers) as client:
        for _ in range(3):
            assert client.get("/v1/files").status_code == 200
        refused = client.get("/v1/files")
        error = assert_error(refused, 429, code="rate_limit_exceeded")
        assert "3 requests per minute" in error["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert upload(client).status_code == 429  # every route counts, uploads too
        assert client.get("/v1/files", headers=other.headers).status_code == 200  # per key
        api = openai.OpenAI(
            base_url="http://testserver/v1", api_key=tenant.key, http_client=client, max_retries=0
        )
        with pytest.raises(openai.RateLimitError):
            api.files.list()


def test_the_limit_is_shared_by_api_processes_through_redis(
    settings: Settings, tenant: Tenant, redis_url: str
) -> None:
    shared = settings.model_copy(update={"rate_limit_per_minute": 4, "rate_limit_storage": redis_url})
    first = TestClient(create_app(shared, RecordingDispatcher()), headers=tenant.headers)
    second = TestClient(create_app(shared, RecordingDispatcher()), headers=tenant.headers)
    with first, second:
        statuses = [client.get("/v1/files").status_code for client in (first, second) * 3]
    assert statuses == [200] * 4 + [429] * 2


def test_an_unreachable_limit_store_lets_requests_through(settings: Settings, tenant: Tenant) -> None:
    down = settings.model_copy(
        update={"rate_limit_per_minute": 1, "rate_limit_storage": "redis://127.0.0.1:1/0"}
    )
    with TestClient(create_app(down, RecordingDispatcher()), headers=tenant.headers) as client:
        assert [client.get("/v1/files").status_code for _ in range(3)] == [200] * 3


def test_failed_authentications_are_limited_per_client_address(settings: Settings, tenant: Tenant) -> None:
    app = create_app(settings.model_copy(update={"auth_failures_per_minute": 3}), RecordingDispatcher())
    guesser = TestClient(app, client=("203.0.113.7", 40000))
    neighbour = TestClient(app, client=("203.0.113.8", 40000), headers=tenant.headers)
    with guesser, neighbour:
        for guess in ("sk-ftj-AAAAAAAAAAAA-" + "x" * 43, ADMIN, ""):
            assert_error(guesser.get("/v1/files", headers={"Authorization": f"Bearer {guess}"}), 401)
        # Over the limit, the address's next request is refused before its key is checked: a right guess
        # can't be told from a wrong one.
        refused = guesser.get("/v1/files", headers=tenant.headers)
        error = assert_error(refused, 429, code="rate_limit_exceeded")
        assert "3 failed authentications a minute from your address" in error["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert neighbour.get("/v1/files").status_code == 200  # per address
        for _ in range(5):  # successes don't count
            assert neighbour.get("/v1/files").status_code == 200
        api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=guesser, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            api.files.list()


def test_a_weak_admin_key_is_refused_at_start() -> None:
    for weak in ("short-admin-key", "password" * 4, "a" * 64, "admin-" * 6):
        with pytest.raises(ValidationError) as refused:
            Settings(admin_key=weak)  # type: ignore[arg-type]
        assert "at least 32 random characters" in str(refused.value) and weak not in str(refused.value)
    for strong in (secrets.token_hex(16), secrets.token_urlsafe(32), ADMIN):
        assert Settings(admin_key=strong).admin_key.get_secret_value() == strong  # type: ignore[arg-type,union-attr]
    started = CliRunner().invoke(cli_app, ["api"], env={"FTJOBS_ADMIN_KEY": "password" * 4})
    assert started.exit_code == 2 and started.stdout == ""
    assert started.stderr.splitlines() == [
        "Error: FTJOBS_ADMIN_KEY: the admin key must be at least 32 random characters; make one with "
        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
    ]
