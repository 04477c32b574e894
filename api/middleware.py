"""Pure ASGI middleware: request ids on every response."""

import uuid

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
