"""OpenAI's error envelope for every failure: `{"error": {"message", "type", "param", "code"}}`."""

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ftjobs.api")
RETRY_AFTER_SECONDS = 5

# Pydantic adds the tried union member to an error's location ("int", "literal['auto']", ...).
_TYPE_TAG = re.compile(r"^(int|float|str|bool|dict|list|none)$|^constrained-|[\[\]'(),]")


class APIError(Exception):
    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status_code, self.param, self.code, self.type = (
            message,
            status_code,
            param,
            code,
            type,
        )
        self.headers = headers


def not_found(what: str, object_id: str, param: str) -> APIError:
    return APIError(f"No such {what}: {object_id!r}", status_code=404, param=param, code="not_found")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope."""

    error: ErrorDetail


RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "model": ErrorResponse,
        "description": "Invalid request (400: `param` names the field), no or a wrong API key (401), not "
        "permitted (403), no such object or route (404, 405), body too large (413), rate limited (429).",
    },
    503: {"model": ErrorResponse, "description": "The database or the inference server is unavailable."},
}
"""What every route may answer besides its success, as the OpenAPI schema declares it. A "4XX" entry also
keeps FastAPI from declaring the 422 it would otherwise add: validation errors are 400s here."""


def envelope(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code)).model_dump()


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and _TYPE_TAG.search(p))]
    return ".".join(parts) or None


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        body = envelope("We could not parse the JSON body of your request.", type="invalid_request_error")
        return JSONResponse(body, status_code=400)
    param = _param(tuple(errors[0]["loc"]))
    # A union ("auto" or a number) fails once per member; say all of it in one message.
    messages = [e["msg"] for e in errors if _param(tuple(e["loc"])) == param]
    detail = " or ".join(dict.fromkeys(messages))
    message = f"Invalid value for '{param}': {detail}" if param else f"Invalid request body: {detail}"
    return JSONResponse(envelope(message, type="invalid_request_error", param=param), status_code=400)


def error_response(exc: APIError) -> JSONResponse:
    body = envelope(exc.message, type=exc.type, param=exc.param, code=exc.code)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(
        envelope(str(exc.detail), type=kind), status_code=exc.status_code, headers=exc.headers
    )


def database_unavailable(method: str, path: str, exc: Exception) -> JSONResponse:
    # Connection refused, server restarting, SQLite locked: transient, so 503 and the SDK retries.
    log.warning("database unavailable on %s %s: %s", method, path, exc)
    return error_response(
        APIError(
            "The service's database is unavailable; retry shortly.",
            status_code=503,
            type="server_error",
            code="service_unavailable",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    )


def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return database_unavailable(request.method, request.url.path, exc)


def _unstorable(request: Request, exc: Exception) -> JSONResponse:
    # The database refused a value the request carried (Postgres keeps no NUL character in text, where
    # SQLite does): the input is at fault, so a 400 like any invalid value, not a 500.
    log.info("database refused a value on %s %s: %s", request.method, request.url.path, exc)
    message = "The request holds text the database cannot take: strings must not contain NUL (\\u0000)."
    return JSONResponse(envelope(message, type="invalid_request_error"), status_code=400)


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Handlers may run outside the `except` that caught `exc` (a sync route's threadpool), where
    # log.exception would find no active exception: pass it explicitly to keep its traceback.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    body = envelope("The server had an error while processing your request.", type="server_error")
    return JSONResponse(body, status_code=500)


def install(app: FastAPI) -> None:
    # Before any route is added: a router's responses apply to the routes added to it afterwards.
    app.router.responses.update(RESPONSES)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(DataError, _unstorable)
    app.add_exception_handler(Exception, _unexpected)
