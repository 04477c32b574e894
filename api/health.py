"""Probes for load balancers and orchestrators: /healthz (alive) and /readyz (able to serve: database,
broker, storage). Neither needs a key; keep them, like /metrics, on a private network."""

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Literal

import anyio
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from sqlalchemy import Engine, text

from models.queue import CeleryDispatcher, Dispatcher
from models.storage import ArtifactStore

CHECK_TIMEOUT_SECONDS = 2.0
"""A dependency that has not answered by then counts as down (the checks run at the same time)."""

router = APIRouter(tags=["health"])


class Check(BaseModel):
    status: Literal["ok", "error", "skipped"]
    detail: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, Check]
    """`database`, `broker` and `storage`."""


OK = Check(status="ok")


@router.get("/healthz")
def healthz(request: Request) -> dict[str, str]:
    """Liveness: the process serves requests and reaches its database."""
    _database(request.app.state.engine)
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={503: {"model": Readiness, "description": "A dependency is down; `checks` says which."}},
)
async def readyz(request: Request, response: Response) -> Readiness:
    """Readiness: the database answers, the broker accepts connections (distributed mode), and the
    artifact store can be used (its directory is writable, or its bucket answers HeadBucket). 200 when
    all are, 503 otherwise; the body has each check's result."""
    state = request.app.state
    probes: dict[str, Callable[[], Check]] = {
        "database": partial(_database, state.engine),
        "broker": partial(_broker, state.dispatcher),
        "storage": partial(_storage, state.store),
    }
    results = await asyncio.gather(*(_checked(probe) for probe in probes.values()))
    checks = dict(zip(probes, results, strict=True))
    ready = all(check.status != "error" for check in checks.values())
    response.status_code = 200 if ready else 503
    return Readiness(status="ready" if ready else "unavailable", checks=checks)


async def _checked(probe: Callable[[], Check]) -> Check:
    """Run a blocking probe in a thread; any exception or a timeout is its failure, never a 500."""
    with anyio.move_on_after(CHECK_TIMEOUT_SECONDS):
        try:
            return await anyio.to_thread.run_sync(probe, abandon_on_cancel=True)
        except Exception as error:
            first_line = (str(error).splitlines() or [""])[0][:300]
            return Check(status="error", detail=f"{type(error).__name__}: {first_line}")
    return Check(status="error", detail=f"no answer within {CHECK_TIMEOUT_SECONDS:g} s")


def _database(engine: Engine) -> Check:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return OK


def _broker(dispatcher: Dispatcher) -> Check:
    if not isinstance(dispatcher, CeleryDispatcher):
        return Check(status="skipped", detail="embedded mode: jobs are dispatched in process, no broker")
    with dispatcher.celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=0)  # one attempt: a probe reports, it does not wait
    return OK


def _storage(store: ArtifactStore) -> Check:
    store.probe()  # a local directory: writable; object storage: the bucket answers (HeadBucket)
    return OK
