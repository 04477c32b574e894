import re
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from api.deps import DispatcherDep, OrgDep, SessionDep, SettingsDep, StoreDep
from api.idempotency import IdempotencyDep
from api.jobs import service as job_service
from api.jobs.schemas import (
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    JobCreate,
    check_metadata,
)
from api.pagination import After, Limit, ListPage, list_page
from models.errors import APIError
from models.states import JobStatus

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

_METADATA_KEY = re.compile(r"^metadata\[(.+)\]$")


def _metadata_filter(request: Request) -> tuple[dict[str, str] | None, bool]:
    """`?metadata[k]=v` pairs (ANDed), or `?metadata=null` for jobs without metadata."""
    pairs: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if match := _METADATA_KEY.match(key):
            pairs[match.group(1)] = value
    try:
        check_metadata(pairs)
    except ValueError as error:
        raise APIError(f"Invalid metadata filter: {error}.", param="metadata") from None
    no_metadata = request.query_params.get("metadata") == "null"
    if no_metadata and pairs:
        raise APIError("Use either metadata=null or metadata[key]=value filters, not both.", param="metadata")
    return pairs or None, no_metadata


@router.post("", response_model=FineTuningJob)
def create_job(
    body: JobCreate,
    session: SessionDep,
    store: StoreDep,
    dispatcher: DispatcherDep,
    org: OrgDep,
    idempotency: IdempotencyDep,
    settings: SettingsDep,
) -> Any:
    """Create a fine-tuning job; its files are validated by the job itself."""
    return idempotency.run(
        lambda: body.model_dump_json().encode(),
        lambda: FineTuningJob.of(
            job_service.create(
                session,
                store,
                dispatcher,
                org,
                body,
                settings.max_active_jobs,
                settings.devices,
                several_nodes=settings.executor == "slurm",
            )
        ),
    )


@router.get("")
def list_jobs(
    request: Request,
    session: SessionDep,
    org: OrgDep,
    after: After = None,
    limit: Annotated[int, Limit(100)] = 20,
    status: Annotated[
        list[JobStatus] | None, Query(description="Extension: only jobs in these statuses.")
    ] = None,
) -> ListPage[FineTuningJob]:
    """List jobs, newest first; filter with `metadata[key]=value` and (extension) `status`, repeatable."""
    metadata, no_metadata = _metadata_filter(request)
    rows, has_more = job_service.list_jobs(
        session, org, metadata=metadata, no_metadata=no_metadata, statuses=status, after=after, limit=limit
    )
    return list_page(rows, has_more, FineTuningJob.of)


@router.get("/{fine_tuning_job_id}")
def retrieve_job(fine_tuning_job_id: str, session: SessionDep, org: OrgDep) -> FineTuningJob:
    """Retrieve a job."""
    return FineTuningJob.of(job_service.get(session, org, fine_tuning_job_id))


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
def cancel_job(fine_tuning_job_id: str, session: SessionDep, org: OrgDep, idempotency: IdempotencyDep) -> Any:
    """Cancel a job that has not finished; nothing of a cancelled job is published."""
    return idempotency.run(
        lambda: b"", lambda: FineTuningJob.of(job_service.cancel(session, org, fine_tuning_job_id))
    )


@router.post("/{fine_tuning_job_id}/pause", response_model=FineTuningJob)
def pause_job(fine_tuning_job_id: str, session: SessionDep, org: OrgDep, idempotency: IdempotencyDep) -> Any:
    """Pause a job: its trainer checkpoints and stops, freeing the worker."""
    return idempotency.run(
        lambda: b"", lambda: FineTuningJob.of(job_service.pause(session, org, fine_tuning_job_id))
    )


@router.post("/{fine_tuning_job_id}/resume", response_model=FineTuningJob)
def resume_job(
    fine_tuning_job_id: str,
    session: SessionDep,
    dispatcher: DispatcherDep,
    org: OrgDep,
    idempotency: IdempotencyDep,
) -> Any:
    """Resume a paused job from its latest checkpoint."""
    return idempotency.run(
        lambda: b"",
        lambda: FineTuningJob.of(job_service.resume(session, dispatcher, org, fine_tuning_job_id)),
    )


@router.get("/{fine_tuning_job_id}/events")
def list_events(
    fine_tuning_job_id: str,
    session: SessionDep,
    org: OrgDep,
    after: After = None,
    limit: Annotated[int, Limit(1000)] = 20,
) -> ListPage[FineTuningJobEvent]:
    """A job's events, newest first."""
    rows, has_more = job_service.list_events(session, org, fine_tuning_job_id, after=after, limit=limit)
    return list_page(rows, has_more, FineTuningJobEvent.model_validate)


@router.get("/{fine_tuning_job_id}/checkpoints")
def list_checkpoints(
    fine_tuning_job_id: str,
    session: SessionDep,
    org: OrgDep,
    after: After = None,
    limit: Annotated[int, Limit(100)] = 10,
) -> ListPage[FineTuningJobCheckpoint]:
    """A job's checkpoints, newest first."""
    rows, has_more = job_service.list_checkpoints(session, org, fine_tuning_job_id, after=after, limit=limit)
    return list_page(rows, has_more, FineTuningJobCheckpoint.model_validate)
