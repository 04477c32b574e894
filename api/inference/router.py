"""OpenAI's inference routes. The API validates the request and resolves its `model` (a base, a fine-tuned
model or a checkpoint of the caller's organisation) into a target, then streams the inference server's
answer back unchanged: models load in `ftjobs serve`, never in the API process."""

from collections.abc import Iterator
from typing import Annotated

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api.deps import OrgDep, SessionDep, StoreDep
from api.errors import RETRY_AFTER_SECONDS
from api.registry import service as model_service
from models.errors import APIError
from models.inference import (
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    Forwarded,
    InferenceRequest,
)
from models.settings import Settings
from models.storage import ArtifactStore
from models.versions import ModelVersions

router = APIRouter(prefix="/v1", tags=["inference"])

CONNECT_SECONDS = 5.0
READ_SECONDS = 600.0
"""Longest silence between two chunks of an answer: a first load of a large base model, or a long
non-streamed generation, stays under it."""


def inference_client(settings: Settings) -> httpx.Client:
    token = settings.inference_token
    return httpx.Client(
        base_url=settings.inference_url,
        timeout=httpx.Timeout(CONNECT_SECONDS, read=READ_SECONDS),
        headers={"Authorization": f"Bearer {token.get_secret_value()}"} if token else None,
    )


def get_client(request: Request) -> httpx.Client:
    client: httpx.Client = request.app.state.inference
    return client


ClientDep = Annotated[httpx.Client, Depends(get_client)]


def inference_unavailable(client: httpx.Client, error: httpx.TransportError) -> APIError:
    return APIError(
        f"The inference server at {client.base_url} is not reachable ({type(error).__name__}); start it "
        "with `ftjobs serve` (`ftjobs up` starts one).",
        status_code=503,
        type="server_error",
        code="inference_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _forward(
    client: httpx.Client, session: Session, store: ArtifactStore, org: str, path: str, body: InferenceRequest
) -> StreamingResponse:
    version = ModelVersions(session).get(org, body.model)
    if version is None:  # OpenAI's code on these routes; /v1/models/{id} says not_found, as for any id
        raise APIError(
            f"The model {body.model!r} does not exist or you do not have access to it.",
            status_code=404,
            param="model",
            code="model_not_found",
        )
    target = model_service.target(store, version)
    payload = Forwarded(target=target, request=body.model_dump(exclude_none=True))
    forwarded = client.build_request("POST", f"/internal/{path}", json=payload.model_dump(mode="json"))
    try:
        response = client.send(forwarded, stream=True)
    except httpx.TransportError as error:
        raise inference_unavailable(client, error) from error

    def relay() -> Iterator[bytes]:
        try:
            yield from response.iter_raw()
        finally:
            response.close()

    return StreamingResponse(
        relay(),
        status_code=response.status_code,
        media_type=response.headers.get("content-type"),
    )


@router.post("/chat/completions")
def chat_completions(
    body: ChatCompletionRequest, client: ClientDep, session: SessionDep, store: StoreDep, org: OrgDep
) -> StreamingResponse:
    """Chat with a base model, a fine-tuned model or a checkpoint (`stream: true` for server-sent events)."""
    return _forward(client, session, store, org, "chat/completions", body)


@router.post("/completions")
def completions(
    body: CompletionRequest, client: ClientDep, session: SessionDep, store: StoreDep, org: OrgDep
) -> StreamingResponse:
    """Complete a prompt (OpenAI's legacy completions)."""
    return _forward(client, session, store, org, "completions", body)


@router.post("/classifications")
def classifications(
    body: ClassificationRequest, client: ClientDep, session: SessionDep, store: StoreDep, org: OrgDep
) -> StreamingResponse:
    """Extension: labels and scores from a fine-tuned text classifier."""
    return _forward(client, session, store, org, "classifications", body)
