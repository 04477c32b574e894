"""Who is calling. Every /v1 request carries `Authorization: Bearer <key>`; the key is checked, and counted
against its rate limit, before the request's body is read. Failed checks are counted per client address:
an address over `auth_failures_per_minute` gets 429 without its key being checked, so keys can't be
guessed at full speed.

The check is ASGI middleware rather than a route dependency because FastAPI parses (and spools to disk) a
multipart upload before a route's dependencies run: as a dependency, anyone without a key could make the
server store a body. The `principal` dependency hands the middleware's result to the routes and declares
the Bearer scheme in the OpenAPI schema.
"""

import contextlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from api import errors
from api.ratelimit import RateLimited, RateLimiter
from models.auth import ApiKeys, Principal, hash_key
from models.db import session_scope
from models.errors import APIError
from web.errors import error_response

PROTECTED = "/v1/"
SETTINGS_ADMIN = "admin-setting"
"""The key id of the admin key given by `FTJOBS_ADMIN_KEY` (it has no row)."""

bearer = HTTPBearer(
    auto_error=False,
    description="An organisation's API key (`sk-ftj-…`); the admin key (`FTJOBS_ADMIN_KEY` or the one "
    "printed at first start) for the /v1/admin routes.",
)


class Authenticate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.failures: RateLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
            await self.app(scope, receive, send)
            return
        state: State = scope["app"].state
        if self.failures is None:
            settings = state.settings
            self.failures = RateLimiter(settings.auth_failures_per_minute, settings.rate_limit_storage)
        # Behind a reverse proxy this is the proxy's address unless the server is told to trust its
        # forwarded headers (uvicorn --forwarded-allow-ips).
        address = (scope.get("client") or ("unknown", 0))[0]
        try:
            principal = await run_in_threadpool(
                _authenticate, state, _bearer_key(scope), self.failures, address
            )
        except APIError as exc:
            await error_response(exc)(scope, receive, send)
            return
        except OperationalError as exc:
            await errors.database_unavailable(scope["method"], scope["path"], exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def _bearer_key(scope: Scope) -> str | None:
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


def _authenticate(state: State, key: str | None, failures: RateLimiter, address: str) -> Principal:
    failing = f"unauthenticated/{address}"
    try:
        failures.check(failing)
    except RateLimited as exc:
        raise _rate_limited(exc, "failed authentications a minute from your address") from exc
    try:
        principal = _principal(state, key)
    except APIError:
        with contextlib.suppress(RateLimited):  # this one is answered 401; the next ones, 429
            failures.hit(failing)
        raise
    try:
        state.limiter.hit(principal.key_id)
    except RateLimited as exc:
        raise _rate_limited(exc, "requests per minute for this API key") from exc
    return principal


def _principal(state: State, key: str | None) -> Principal:
    if key is None:
        raise _unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
    admin_key = state.settings.admin_key
    if admin_key is not None and hmac.compare_digest(hash_key(key), hash_key(admin_key.get_secret_value())):
        return Principal(SETTINGS_ADMIN, None)
    with session_scope(state.session_factory) as session:
        found = ApiKeys(session).authenticate(key)
    if found is None:
        shown = f"{key[:10]}...{key[-4:]}" if len(key) > 20 else "***"
        raise _unauthorized(f"Incorrect or revoked API key provided: {shown}.")
    return found


def _rate_limited(exc: RateLimited, what: str) -> APIError:
    return APIError(
        f"Rate limit reached: {exc.limit} {what}. Retry in {exc.retry_after} s.",
        status_code=429,
        type="requests",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(exc.retry_after)},
    )


def _unauthorized(message: str) -> APIError:
    return APIError(message, status_code=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def principal(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    result: Principal = request.state.principal
    return result


def organization_id(caller: Annotated[Principal, Depends(principal)]) -> str:
    if caller.organization_id is None:
        raise APIError(
            "The admin key manages organisations and keys; use an organisation's API key for this route.",
            status_code=403,
            code="permission_denied",
        )
    return caller.organization_id


def admin(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    if not caller.is_admin:
        raise APIError("This route needs the admin key.", status_code=403, code="permission_denied")
    return caller
