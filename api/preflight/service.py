"""The pre-flight estimate (docs/preflight.md). The request is checked exactly as job creation checks it;
the inference server, which may load tokenizers, measures the files with the training code and sizes the
memory; the duration comes from the throughput earlier jobs measured. Nothing is created or enqueued."""

import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.inference.router import inference_unavailable, until_client_leaves
from api.jobs.schemas import JobCreate
from api.jobs.service import check_request
from api.preflight.schemas import Duration, Preflight
from models.errors import APIError, ErrorResponse
from models.files import FileRepository
from models.jobs import JobRepository
from models.preflight import PreflightFile, PreflightReport, PreflightRequest, scaling_efficiency
from models.scheduling import wait_reason
from models.settings import Settings
from models.storage import ArtifactStore

HISTORY_JOBS = 20
"""How many recent jobs are looked at: the latest to start, for the device; the latest succeeded ones of the
same base model, method and training type, for the throughput."""


async def estimate(
    session: Session,
    store: ArtifactStore,
    client: httpx.AsyncClient,
    settings: Settings,
    organization_id: str,
    body: JobCreate,
    disconnected: Callable[[], Awaitable[bool]],
) -> Preflight:
    request = await run_in_threadpool(inference_request, session, store, settings, organization_id, body)
    report = await ask(client, request, disconnected)
    preflight = await run_in_threadpool(with_duration, session, body.model, request.method, report)
    return await run_in_threadpool(with_workers, session, settings, body, preflight)


def with_workers(session: Session, settings: Settings, body: JobCreate, preflight: Preflight) -> Preflight:
    """`fits: false` when no live worker could run the job, however long it waited (more devices than
    any offers, a class none has): such a job would wait in the queue until one registers."""
    devices, device_class = (body.compute.devices, body.compute.device_class) if body.compute else (1, None)
    waits = wait_reason(session, devices, device_class, now=time.time(), live_seconds=settings.lease_seconds)
    if waits is None:
        return preflight
    reason = f"No live worker can run it: it would wait for {waits}."
    return preflight.model_copy(
        update={"memory": preflight.memory.model_copy(update={"fits": False, "reason": reason})}
    )


def inference_request(
    session: Session, store: ArtifactStore, settings: Settings, organization_id: str, body: JobCreate
) -> PreflightRequest:
    """The request checked as job creation checks it, with its files and base model resolved."""
    method, model = check_request(
        session, store, organization_id, body, settings.devices, several_nodes=settings.executor == "slurm"
    )
    if method["type"] == "reinforcement":
        # Its cost is sampling and grading, which the estimate's token counts and throughput do not measure.
        raise APIError(
            "The pre-flight estimate does not cover reinforcement jobs yet; create the job itself.",
            param="method.type",
        )

    def file(file_id: str) -> PreflightFile:
        record = FileRepository(session).get(organization_id, file_id)
        assert record is not None  # checked with the request
        return PreflightFile(id=file_id, key=record.storage_key)

    return PreflightRequest(
        base_model_path=model.path,
        base_content_hash=model.content_hash,
        method=method,
        training_file=file(body.training_file),
        validation_file=file(body.validation_file) if body.validation_file else None,
        max_file_examples=settings.max_file_examples,
        max_file_tokens=settings.max_file_tokens,
        # Of any organisation's jobs: it is the service's hardware.
        device=JobRepository(session).latest_device(jobs=HISTORY_JOBS),
        devices=body.compute.devices if body.compute else 1,
    )


def with_duration(session: Session, model: str, method: dict[str, Any], report: PreflightReport) -> Preflight:
    """The inference server's report with the duration earlier jobs' throughput gives."""
    method_type = method["type"]
    training_type = method[method_type]["hyperparameters"]["training_type"]
    measured, based_on = throughput(session, model, method_type, training_type)
    devices = report.memory.devices
    efficiency = scaling_efficiency(report.memory.strategy, devices)
    rate = measured * devices * efficiency if measured else None
    tokens = report.training_file.n_tokens * report.n_epochs
    rows = report.training_file.n_rows
    test_tokens = (
        round(report.training_file.n_tokens * report.learning_rate_test_examples / rows) if rows else 0
    )
    warnings = list(report.warnings)
    if rate is None:
        warnings.append(
            f"No succeeded {method_type} {training_type} job of {model} has measured its throughput "
            "yet: the duration is unknown until one has."
        )
    duration = Duration(
        estimated_seconds=(tokens + test_tokens) / rate if rate else None,
        tokens_per_second=rate,
        based_on_jobs=based_on,
        n_epochs=report.n_epochs,
        tokens_to_train=tokens,
        range_test_tokens=test_tokens,
        devices=devices,
        scaling_efficiency=efficiency,
    )
    fields = {**report.model_dump(), "model": model, "duration": duration, "warnings": warnings}
    return Preflight.model_validate(fields)


def throughput(
    session: Session, model: str, method_type: str, training_type: str
) -> tuple[float | None, int]:
    """Tokens per second of the training loop over the latest succeeded jobs of this base model, method and
    training type, and how many jobs that is. Throughput is the hardware's, so every organisation's jobs
    count; only this aggregate is shown."""
    measured = JobRepository(session).measured_throughputs(
        model, method_type, training_type, jobs=HISTORY_JOBS
    )
    seconds = sum(job.elapsed_seconds or 0.0 for job in measured)
    if not seconds:
        return None, 0
    return sum(job.trained_tokens for job in measured) / seconds, len(measured)


async def ask(
    client: httpx.AsyncClient, request: PreflightRequest, disconnected: Callable[[], Awaitable[bool]]
) -> PreflightReport:
    """The inference server's report; its 400s (what the job would fail on, a file too costly to estimate)
    are relayed as they are. If our client leaves first the call is cancelled, which closes its connection,
    and the inference server stops the work when it sees that."""
    call = client.post("/internal/preflight", json=request.model_dump(mode="json"))
    try:
        response = await until_client_leaves(call, disconnected)
    except httpx.TransportError as error:
        raise inference_unavailable(client, error) from error
    if response.status_code == 200:
        return PreflightReport.model_validate_json(response.content)
    try:
        error = ErrorResponse.model_validate_json(response.content).error
    except ValidationError:
        message = f"The inference server answered {response.status_code} without an error body."
        raise APIError(message, status_code=502, type="server_error") from None
    raise APIError(
        error.message, status_code=response.status_code, param=error.param, code=error.code, type=error.type
    )
