"""The service's one error type and OpenAI's error envelope, `{"error": {"message", "type", "param",
"code"}}`. Raised below the web layer too (API services, the inference engine); `web.errors` renders it."""

from typing import Any

from pydantic import BaseModel


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


def envelope(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code)).model_dump()
