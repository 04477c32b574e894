"""Fine-tuning job rules: what may be created, listed, cancelled, paused and resumed. Runners do the rest."""

import random
import time
from collections.abc import Sequence

from sqlalchemy.orm import Session

from api.deps import on_commit
from api.jobs.reinforcement import check_grader
from api.jobs.schemas import Compute, JobCreate
from api.pagination import cursor
from models import ids
from models.auth import Organizations
from models.errors import APIError, not_found
from models.files import FileRepository
from models.hyperparameters import APPLIES_TO, HYPERPARAMETERS, SupervisedHyperparameters, inapplicable_key
from models.jobs import JobRepository
from models.objectives import Mismatch, check, objective_for
from models.orm import Job, JobCheckpoint, JobEvent
from models.queue import Dispatcher
from models.registry import ModelRegistry, is_generative
from models.spec import LORA_FAMILY, METHODS
from models.states import ACTIVE, JobStatus, transition
from models.storage import ArtifactStore
from models.validation import peek_format

ACTIVE_JOBS_RETRY_SECONDS = 60
"""What a 429 for too many unfinished jobs suggests: jobs take minutes, so checking back each minute."""


def _check_file(session: Session, organization_id: str, file_id: str, param: str) -> None:
    file = FileRepository(session).get(organization_id, file_id)
    if file is None:
        raise APIError(f"Invalid {param}: no such file {file_id!r}.", param=param, code="file_not_found")
    if file.purpose != "fine-tune":
        raise APIError(
            f"Invalid {param}: file {file_id!r} has purpose {file.purpose!r}, expected 'fine-tune'.",
            param=param,
            code="invalid_file_purpose",
        )


def _method(body: JobCreate) -> tuple[str, SupervisedHyperparameters, str]:
    """The method type, its hyperparameters and where they were given: `method` wins; the legacy
    top-level hyperparameters mean supervised."""
    if body.method is not None and body.hyperparameters is not None:
        raise APIError(
            "Give hyperparameters in method.supervised.hyperparameters or in the deprecated top-level "
            "hyperparameters, not both.",
            param="hyperparameters",
        )
    if body.method is None:
        return "supervised", body.hyperparameters or SupervisedHyperparameters(), "hyperparameters"
    method_type = body.method.type
    if method_type == "reinforcement" and body.method.reinforcement is None:
        raise APIError(
            "A reinforcement job needs method.reinforcement with the grader that scores its answers.",
            param="method.reinforcement.grader",
        )
    given = getattr(body.method, method_type)
    hyperparameters = given.hyperparameters if given else HYPERPARAMETERS[method_type]()
    return method_type, hyperparameters, f"method.{method_type}.hyperparameters"


def _check_method(
    session: Session, store: ArtifactStore, organization_id: str, body: JobCreate
) -> dict[str, object]:
    """The method as stored, once it fits its training type, base model and training file (a 400 for
    what cannot train; a file that does not parse is left to the job's own validation)."""
    method_type, hyperparameters, where = _method(body)
    if key := inapplicable_key(hyperparameters):
        applies_to = ", ".join(sorted(APPLIES_TO[key]))
        training_type = hyperparameters.training_type
        raise APIError(
            f"`{key}` does not apply to training_type {training_type!r} (only to {applies_to}).",
            param=f"{where}.{key}",
        )
    file = FileRepository(session).get(organization_id, body.training_file)
    model = ModelRegistry(session).get(body.model)
    assert file is not None and model is not None  # checked by the caller
    reinforcement = body.method.reinforcement if body.method else None
    with store.open(file.storage_key) as stream:
        data_format = peek_format(stream, prompts=reinforcement is not None)
    if data_format is not None:
        objective = objective_for(method_type, data_format)
        mismatch = (
            objective
            if isinstance(objective, Mismatch)
            else check(
                objective,
                training_type=hyperparameters.training_type,
                generative_base=is_generative(model),
                given=hyperparameters.given(),
                metric=hyperparameters.metric_for_best_checkpoint,
                where=where,
            )
        )
        if mismatch:
            raise APIError(mismatch.message, param=mismatch.param)
    if body.export_merged and hyperparameters.training_type not in LORA_FAMILY:
        raise APIError(
            f"export_merged applies to lora, dora and qlora; a {hyperparameters.training_type} job's "
            "artifact is not an adapter to merge.",
            param="export_merged",
        )
    settings: dict[str, object] = {"hyperparameters": hyperparameters.model_dump()}
    if reinforcement is not None:
        files = {"training_file": file}
        if body.validation_file is not None and (
            valid := FileRepository(session).get(organization_id, body.validation_file)
        ):
            files["validation_file"] = valid
        check_grader(session, store, organization_id, reinforcement, files)
        settings |= reinforcement.model_dump(include={"grader", "response_format"})
    return {"type": method_type, method_type: settings}


def check_request(
    session: Session, store: ArtifactStore, organization_id: str, body: JobCreate
) -> dict[str, object]:
    """The rules a job request must pass before anything is stored, as job creation and the pre-flight
    estimate (api/preflight) apply them: its model, its files and its method (400s). Returns the method as
    stored."""
    if ModelRegistry(session).get(body.model) is None:
        raise APIError(
            f"Model {body.model!r} is not available; "
            "register it with `ftjobs models pull` or `ftjobs models add`.",
            param="model",
            code="model_not_found",
        )
    _check_file(session, organization_id, body.training_file, "training_file")
    if body.validation_file is not None:
        _check_file(session, organization_id, body.validation_file, "validation_file")
    return _check_method(session, store, organization_id, body)


def check_compute(compute: Compute, training_type: str, max_devices: int | None) -> None:
    """What this service can train one job on: one node, no device classes yet, at most the workers'
    devices (`max_devices`, when the API knows it), and several devices only for a method that trains
    data-parallel."""
    if compute.nodes > 1:
        raise APIError("A job runs on one node for now; compute.nodes must be 1.", param="compute.nodes")
    if compute.device_class is not None:
        raise APIError(
            "This service has no device classes configured; leave compute.device_class unset.",
            param="compute.device_class",
        )
    if max_devices is not None and compute.devices > max_devices:
        raise APIError(
            f"compute.devices is {compute.devices}, but the workers train a job on at most {max_devices}.",
            param="compute.devices",
        )
    if compute.devices > 1 and METHODS[training_type].parallel != "ddp":
        raise APIError(
            f"A {training_type} job trains on one device for now; compute.devices must be 1 "
            "(docs/distributed.md says which methods run on several).",
            param="compute.devices",
        )


def create(
    session: Session,
    store: ArtifactStore,
    dispatcher: Dispatcher,
    organization_id: str,
    body: JobCreate,
    max_active: int,
    max_devices: int | None = None,
) -> Job:
    if body.compute is not None:
        check_compute(body.compute, _method(body)[1].training_type, max_devices)
    method = check_request(session, store, organization_id, body)
    repo = JobRepository(session)
    Organizations(session).lock(organization_id)  # two creates can't both take the last free place
    if repo.count_active(organization_id) >= max_active:
        raise APIError(
            f"Your organization has {max_active} unfinished fine-tuning jobs, the most it may have at once; "
            "create this one when one of them has finished, or cancel one.",
            status_code=429,
            code="too_many_active_jobs",
            headers={"Retry-After": str(ACTIVE_JOBS_RETRY_SECONDS)},
        )
    job_id = ids.job_id()
    job = repo.add(
        Job(
            id=job_id,
            organization_id=organization_id,
            model=body.model,
            training_file=body.training_file,
            validation_file=body.validation_file,
            status=JobStatus.VALIDATING_FILES.value,
            method=method,
            suffix=body.suffix,
            seed=body.seed if body.seed is not None else random.randint(0, 2147483647),
            metadata_=body.metadata,
            export_merged=body.export_merged,
            compute=body.compute.model_dump() if body.compute else None,
            integrations=[integration.stored(job_id) for integration in body.integrations or []] or None,
            result_files=[],
            created_at=int(time.time()),
            dispatched_at=time.time(),
            attempt=0,
        )
    )
    repo.add_event(job.id, f"Created fine-tuning job: {job.id}", data={})
    files = f"training file: {job.training_file}"
    if job.validation_file:
        files += f" and validation file: {job.validation_file}"
    repo.add_event(job.id, f"Validating {files}")
    on_commit(session, lambda: dispatcher.submit(job.id))
    return job


def get(session: Session, organization_id: str, job_id: str) -> Job:
    job = JobRepository(session).get(job_id, organization_id)
    if job is None:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return job


def list_jobs(
    session: Session,
    organization_id: str,
    *,
    metadata: dict[str, str] | None,
    no_metadata: bool,
    statuses: Sequence[JobStatus] | None,
    after: str | None,
    limit: int,
) -> tuple[list[Job], bool]:
    repo = JobRepository(session)
    start = cursor(after, lambda job_id: repo.get(job_id, organization_id), "fine-tuning job")
    rows, has_more = repo.list(
        organization_id,
        metadata=metadata,
        no_metadata=no_metadata,
        statuses=statuses,
        after=start,
        limit=limit,
    )
    return list(rows), has_more


def _move(
    session: Session,
    organization_id: str,
    job_id: str,
    *,
    from_: frozenset[JobStatus] | tuple[JobStatus, ...],
    to: JobStatus,
    event: str,
    values: dict[str, object] | None = None,
) -> Job:
    """A client-requested status change (cancel, pause, resume): one CAS, or a 400 saying why not."""
    job = get(session, organization_id, job_id)
    if not transition(session, job.id, from_=from_, to=to, values=values):
        session.refresh(job)
        allowed = " or ".join(sorted(from_))
        raise APIError(f"Job {job_id} is {job.status}; only {allowed} jobs can be {to}.")
    JobRepository(session).add_event(job.id, event)
    session.flush()
    session.refresh(job)
    return job


def cancel(session: Session, organization_id: str, job_id: str) -> Job:
    """Cancel wins over whatever the runner does next: its own final write is a CAS from `running`."""
    values = {"finished_at": int(time.time()), "estimated_finish": None}
    return _move(
        session,
        organization_id,
        job_id,
        from_=ACTIVE,
        to=JobStatus.CANCELLED,
        event="Fine-tuning job cancelled",
        values=values,
    )


def pause(session: Session, organization_id: str, job_id: str) -> Job:
    """Stop a running (or waiting) job at a checkpoint and free its worker; `resume` continues it."""
    waiting_or_running = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING)
    return _move(
        session,
        organization_id,
        job_id,
        from_=waiting_or_running,
        to=JobStatus.PAUSED,
        event="Fine-tuning job paused",
        values={"estimated_finish": None},
    )


def resume(session: Session, dispatcher: Dispatcher, organization_id: str, job_id: str) -> Job:
    """Queue a paused job again; its next attempt continues from its latest checkpoint."""
    job = _move(
        session,
        organization_id,
        job_id,
        from_=(JobStatus.PAUSED,),
        to=JobStatus.QUEUED,
        event="Fine-tuning job resumed",
        values={"dispatched_at": time.time()},
    )
    on_commit(session, lambda: dispatcher.submit(job.id))
    return job


def list_events(
    session: Session, organization_id: str, job_id: str, *, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    job = get(session, organization_id, job_id)
    repo = JobRepository(session)
    start = cursor(after, lambda event_id: repo.get_event(job.id, event_id), "event")
    rows, has_more = repo.list_events(job.id, after=start, limit=limit)
    return list(rows), has_more


def list_checkpoints(
    session: Session, organization_id: str, job_id: str, *, after: str | None, limit: int
) -> tuple[list[JobCheckpoint], bool]:
    job = get(session, organization_id, job_id)
    repo = JobRepository(session)
    start = cursor(after, lambda checkpoint_id: repo.get_checkpoint(job.id, checkpoint_id), "checkpoint")
    rows, has_more = repo.list_checkpoints(job.id, after=start, limit=limit)
    return list(rows), has_more
