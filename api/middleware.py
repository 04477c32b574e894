"""Pure ASGI middleware: request ids on every response, and the body-size limit."""

import uuid

from fastapi import HTTPException
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models import logs


class RequestId:
    """Echo the client's `x-request-id` or mint one, on every response (the SDK reports it in errors)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:128]
        request_id = given or f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        # Every log line of this request names it, the 500 handler's too (it runs outside this middleware):
        # the variable is not reset, since each request runs in a task (and a context) of its own.
        logs.request_id.set(request_id)
        await self.app(scope, receive, send_with_id)


class BodySizeLimit:
    """413 as soon as a body is known to exceed the limit: from Content-Length, or while it streams in.

    Raising an HTTPException from `receive` makes FastAPI's body parsing re-raise it as is, so the
    client gets a 413 in the error envelope and nothing beyond the limit is spooled to disk.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"Request body is larger than the limit of {self.max_bytes} bytes.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            # Checked lazily (on first read) so the error goes through the app's handlers.
            async def refuse() -> Message:
                raise self._too_large()

            await self.app(scope, refuse, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, counting_receive, send)
