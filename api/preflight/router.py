from collections.abc import AsyncIterator
from typing import Annotated

import httpx
from fastapi import APIRouter, Depends, Request

from api.deps import OrgDep, SessionDep, SettingsDep, StoreDep
from api.inference.router import ClientDep
from api.jobs.schemas import JobCreate
from api.preflight import service
from api.preflight.schemas import Preflight

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


async def inference_client(client: ClientDep) -> AsyncIterator[httpx.AsyncClient]:
    """The inference server, as the app's client reaches it but asynchronously: a call awaited, unlike one
    blocking a thread, can be cancelled when our own client leaves."""
    async with httpx.AsyncClient(
        base_url=client.base_url, headers=client.headers, timeout=client.timeout
    ) as inference:
        yield inference


@router.post("/preflight")
async def preflight(
    body: JobCreate,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    inference: Annotated[httpx.AsyncClient, Depends(inference_client)],
    settings: SettingsDep,
    org: OrgDep,
) -> Preflight:
    """Extension: what a job created with this body would train on, need and take, before anything runs
    (counts, truncation, a loss-mask preview, memory, duration). Nothing is created."""
    return await service.estimate(session, store, inference, settings, org, body, request.is_disconnected)
