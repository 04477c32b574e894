"""The API's error handling on top of `web.errors`: its database's failures, and the errors every route
declares in the OpenAPI schema."""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError

from models.errors import APIError, ErrorResponse, envelope
from models.storage import StoreUnavailable
from web import errors as web_errors

log = logging.getLogger("ftjobs.api")
RETRY_AFTER_SECONDS = 5

RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "model": ErrorResponse,
        "description": "Invalid request (400: `param` names the field), no or a wrong API key (401), not "
        "permitted (403), no such object or route (404, 405), body too large (413), rate limited (429).",
    },
    503: {
        "model": ErrorResponse,
        "description": "The database, the artifact store or the inference server is unavailable.",
    },
}
"""What every route may answer besides its success, as the OpenAPI schema declares it. A "4XX" entry also
keeps FastAPI from declaring the 422 it would otherwise add: validation errors are 400s here."""


def database_unavailable(method: str, path: str, exc: Exception) -> JSONResponse:
    # Connection refused, server restarting, SQLite locked: transient, so 503 and the SDK retries.
    log.warning("database unavailable on %s %s: %s", method, path, exc)
    return _unavailable("database")


def _unavailable(what: str) -> JSONResponse:
    return web_errors.error_response(
        APIError(
            f"The service's {what} is unavailable; retry shortly.",
            status_code=503,
            type="server_error",
            code="service_unavailable",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    )


def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return database_unavailable(request.method, request.url.path, exc)


def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Object storage that does not answer (or answers 5xx) is as transient as a database outage.
    log.warning("artifact store unavailable on %s %s: %s", request.method, request.url.path, exc)
    return _unavailable("artifact store")


def _unstorable(request: Request, exc: Exception) -> JSONResponse:
    # The database refused a value the request carried (Postgres keeps no NUL character in text, where
    # SQLite does): the input is at fault, so a 400 like any invalid value, not a 500.
    log.info("database refused a value on %s %s: %s", request.method, request.url.path, exc)
    message = "The request holds text the database cannot take: strings must not contain NUL (\\u0000)."
    return JSONResponse(envelope(message, type="invalid_request_error"), status_code=400)


def install(app: FastAPI) -> None:
    # Before any route is added: a router's responses apply to the routes added to it afterwards.
    app.router.responses.update(RESPONSES)
    web_errors.install(app, log)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(DataError, _unstorable)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
