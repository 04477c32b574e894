"""OpenAI's error envelope for every failure of a FastAPI app: `APIError`s, request validation, Starlette's
404 and 405, and the unexpected (a 500). The API adds its database's failures (`api.errors`)."""

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import APIError, envelope

# Pydantic adds the tried union member to an error's location ("int", "literal['auto']", ...).
_TYPE_TAG = re.compile(r"^(int|float|str|bool|dict|list|none)$|^constrained-|[\[\]'(),]")


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and _TYPE_TAG.search(p))]
    return ".".join(parts) or None


def _unsupported_content_type(content_type: str | None) -> JSONResponse:
    """OpenAI's answer to a JSON route's body sent as something else (a form, text, no Content-Type)."""
    shown, told = (
        (repr(content_type), f"specified the header 'Content-Type: {content_type}'")
        if content_type
        else ("none", "sent no Content-Type header")
    )
    message = (
        f"Unsupported content type: {shown}. This API method only accepts 'application/json' requests, "
        f"but you {told}. Please try again with a supported content type."
    )
    body = envelope(message, type="invalid_request_error", code="unsupported_content_type")
    return JSONResponse(body, status_code=400)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    # FastAPI parses a body as JSON only under a JSON Content-Type; any other reaches validation as bytes.
    if any(tuple(e["loc"]) == ("body",) and isinstance(e.get("input"), bytes) for e in errors):
        return _unsupported_content_type(request.headers.get("content-type"))
    if any(e["type"] == "json_invalid" for e in errors):
        body = envelope("We could not parse the JSON body of your request.", type="invalid_request_error")
        return JSONResponse(body, status_code=400)
    param = _param(tuple(errors[0]["loc"]))
    if errors[0]["type"] == "extra_forbidden":  # OpenAI's words for a key it doesn't know
        message = f"Unrecognized request argument supplied: {param}"
        return JSONResponse(envelope(message, type="invalid_request_error", param=param), status_code=400)
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


def install(app: FastAPI, log: logging.Logger) -> None:
    """The handlers, with the app's own logger for the unexpected."""

    def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Handlers may run outside the `except` that caught `exc` (a sync route's threadpool), where
        # log.exception would find no active exception: pass it explicitly to keep its traceback.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        body = envelope("The server had an error while processing your request.", type="server_error")
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, unexpected)
