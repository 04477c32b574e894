"""OpenAI's inference routes. The API validates the request and resolves its `model` (a base, a fine-tuned
model or a checkpoint of the caller's organisation) into a target, then streams the inference server's
answer back unchanged: models load in `ftjobs serve`, never in the API process.

Forwarding is asynchronous, so that a client who leaves takes its upstream call with it: while the inference
server has not answered (a non-streamed generation answers only when done) the API watches its own client,
and if it hangs up cancels the call, which closes the upstream connection; the inference server sees that
and drops the request's rows from its batch. A stream is relayed chunk by chunk and closed the same way."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import Annotated, TypeVar

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import OrgDep, SessionDep, StoreDep
from api.errors import RETRY_AFTER_SECONDS
from models.errors import APIError, client_closed_request
from models.inference import (
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    Forwarded,
    InferenceRequest,
)
from models.settings import Settings
from models.storage import ArtifactStore
from models.targets import target
from models.versions import ModelVersions

router = APIRouter(prefix="/v1", tags=["inference"])

CONNECT_SECONDS = 5.0
READ_SECONDS = 600.0
"""Longest silence between two chunks of an answer: a first load of a large base model, or a long
non-streamed generation, stays under it."""
TIMEOUT = httpx.Timeout(CONNECT_SECONDS, read=READ_SECONDS)
DISCONNECT_POLL_SECONDS = 0.2
Answer = TypeVar("Answer")


def inference_client(settings: Settings) -> httpx.Client:
    """The inference server for the API's synchronous callers (a grader's judge)."""
    return httpx.Client(base_url=settings.inference_url, timeout=TIMEOUT, headers=_headers(settings))


def async_inference_client(settings: Settings) -> httpx.AsyncClient:
    """The inference server for forwarding: one client per forwarded request, closed with its answer (an
    async client belongs to the event loop it first ran on)."""
    return httpx.AsyncClient(base_url=settings.inference_url, timeout=TIMEOUT, headers=_headers(settings))


def _headers(settings: Settings) -> dict[str, str] | None:
    token = settings.inference_token
    return {"Authorization": f"Bearer {token.get_secret_value()}"} if token else None


async def until_client_leaves(call: Awaitable[Answer], disconnected: Callable[[], Awaitable[bool]]) -> Answer:
    """`call`'s result; if our client hangs up first, the call is cancelled (closing its connection to the
    inference server, which then stops the work) and the answer is a 499 nobody reads."""
    task = asyncio.ensure_future(call)
    while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS))[0]:
        if await disconnected():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            raise client_closed_request()
    return task.result()


def get_client(request: Request) -> httpx.Client:
    client: httpx.Client = request.app.state.inference
    return client


ClientDep = Annotated[httpx.Client, Depends(get_client)]


def inference_unavailable(client: httpx.Client | httpx.AsyncClient, error: httpx.TransportError) -> APIError:
    return APIError(
        f"The inference server at {client.base_url} is not reachable ({type(error).__name__}); start it "
        "with `ftjobs serve` (`ftjobs up` starts one).",
        status_code=503,
        type="server_error",
        code="inference_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _forwarded(session: Session, store: ArtifactStore, org: str, body: InferenceRequest) -> Forwarded:
    version = ModelVersions(session).get(org, body.model)
    if version is None:  # OpenAI's code on these routes; /v1/models/{id} says not_found, as for any id
        raise APIError(
            f"The model {body.model!r} does not exist or you do not have access to it.",
            status_code=404,
            param="model",
            code="model_not_found",
        )
    return Forwarded(
        target=target(store, version), request=body.model_dump(exclude_none=True), organization=org
    )


async def _forward(
    http: Request, session: Session, store: ArtifactStore, org: str, path: str, body: InferenceRequest
) -> StreamingResponse:
    payload = await run_in_threadpool(_forwarded, session, store, org, body)
    open_client: Callable[[], httpx.AsyncClient] = http.app.state.open_inference
    client = open_client()
    try:
        forwarded = client.build_request("POST", f"/internal/{path}", json=payload.model_dump(mode="json"))
        try:
            response = await until_client_leaves(client.send(forwarded, stream=True), http.is_disconnected)
        except httpx.TransportError as error:
            raise inference_unavailable(client, error) from error
    except BaseException:
        await client.aclose()
        raise

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()
            await client.aclose()

    return StreamingResponse(
        relay(),
        status_code=response.status_code,
        media_type=response.headers.get("content-type"),
    )


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, http: Request, session: SessionDep, store: StoreDep, org: OrgDep
) -> StreamingResponse:
    """Chat with a base model, a fine-tuned model or a checkpoint (`stream: true` for server-sent events)."""
    return await _forward(http, session, store, org, "chat/completions", body)


@router.post("/completions")
async def completions(
    body: CompletionRequest, http: Request, session: SessionDep, store: StoreDep, org: OrgDep
) -> StreamingResponse:
    """Complete a prompt (OpenAI's legacy completions)."""
    return await _forward(http, session, store, org, "completions", body)


@router.post("/classifications")
async def classifications(
    body: ClassificationRequest, http: Request, session: SessionDep, store: StoreDep, org: OrgDep
) -> StreamingResponse:
    """Extension: labels and scores from a fine-tuned text classifier."""
    return await _forward(http, session, store, org, "classifications", body)
