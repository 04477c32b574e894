"""The request-body size limit both HTTP apps apply: a small one for JSON bodies, a larger one for uploads."""

from collections.abc import Mapping

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """413 as soon as a body is known to exceed its route's limit: from Content-Length, or as it streams in.

    Every route gets `max_bytes` but the (method, path) pairs of `larger`, which get their own (uploads).
    Raising an HTTPException from `receive` makes FastAPI's body parsing re-raise it as is, so the client
    gets a 413 in the error envelope and nothing beyond the limit is buffered, parsed or spooled to disk.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, larger: Mapping[tuple[str, str], int] | None = None
    ) -> None:
        self.app, self.max_bytes, self.larger = app, max_bytes, dict(larger or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.larger.get((scope["method"], scope["path"]), self.max_bytes)
        too_large = HTTPException(413, f"Request body is larger than this route's limit of {limit} bytes.")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            # Checked lazily (on first read) so the error goes through the app's handlers.
            async def refuse() -> Message:
                raise too_large

            await self.app(scope, refuse, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
            return message

        await self.app(scope, counting_receive, send)
