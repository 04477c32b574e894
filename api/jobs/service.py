"""Fine-tuning job rules: what may be created, listed, cancelled, paused and resumed. Runners do the rest."""

import random
import time
from collections.abc import Sequence
from typing import get_args

from sqlalchemy.orm import Session

from api.deps import on_commit
from api.jobs.reinforcement import check_grader
from api.jobs.schemas import Compute, JobCreate
from api.pagination import cursor
from models import ids
from models.auth import Organizations
from models.continuation import Parent, Start, how_to_start, inherit, resolve_model, same_kind
from models.errors import APIError, not_found
from models.files import FileRepository
from models.hyperparameters import (
    APPLIES_TO,
    HYPERPARAMETERS,
    SupervisedHyperparameters,
    inapplicable_key,
    resolve,
)
from models.jobs import JobRepository
from models.objectives import Mismatch, check, objective_for
from models.orm import Job, JobCheckpoint, JobEvent, RegisteredModel
from models.queue import Dispatcher
from models.registry import is_generative
from models.scheduling import Workers, check_budget
from models.spec import LORA_FAMILY, METHODS, Objective
from models.states import ACTIVE, JobStatus, transition
from models.storage import ArtifactStore
from models.validation import peek_format
from models.versions import TUNED_PREFIX

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
    session: Session,
    store: ArtifactStore,
    organization_id: str,
    body: JobCreate,
    model: RegisteredModel,
    parent: Parent | None,
) -> dict[str, object]:
    """The method as stored, once it fits its training type, base model (or the tuned model it continues)
    and training file (a 400 for what cannot train; a file that does not parse is left to the job's own
    validation)."""
    method_type, hyperparameters, where = _method(body)
    if parent is not None:
        hyperparameters = inherit(hyperparameters, parent.hyperparameters)
    if key := inapplicable_key(hyperparameters):
        applies_to = ", ".join(sorted(APPLIES_TO[key]))
        training_type = hyperparameters.training_type
        raise APIError(
            f"`{key}` does not apply to training_type {training_type!r} (only to {applies_to}).",
            param=f"{where}.{key}",
        )
    file = FileRepository(session).get(organization_id, body.training_file)
    assert file is not None  # checked by the caller
    reinforcement = body.method.reinforcement if body.method else None
    with store.open(file.storage_key) as stream:
        data_format = peek_format(stream, prompts=reinforcement is not None)
    objective = objective_for(method_type, data_format) if data_format is not None else None
    if objective is not None:
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
    if parent is not None:
        _check_start(parent, hyperparameters, None if isinstance(objective, Mismatch) else objective)
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


def _check_start(parent: Parent, requested: SupervisedHyperparameters, objective: Objective | None) -> None:
    """A job on a tuned model: the same kind of model (a language model or the same classifier), and a
    training type that can start from its weights (models/continuation.py)."""
    theirs = parent.lineage.objective
    if objective is not None and not same_kind(theirs, objective):
        raise APIError(
            f"{parent.model!r} is a {theirs} model; a {objective} job can't start from it.", param="model"
        )
    start = how_to_start(parent.hyperparameters, resolve(requested, 1, objective or theirs))
    if start not in get_args(Start):
        raise APIError(start, param="model")


def model_not_found(name: str) -> APIError:
    """The same 400 for a model that does not exist and another organisation's."""
    if name.startswith(TUNED_PREFIX):
        message = f"The model {name!r} does not exist or you do not have access to it."
    else:
        message = (
            f"Model {name!r} is not available; register it with `ftjobs models pull` or `ftjobs models add`."
        )
    return APIError(message, param="model", code="model_not_found")


def check_request(
    session: Session,
    store: ArtifactStore,
    organization_id: str,
    body: JobCreate,
    max_devices: int | None = None,
    several_nodes: bool = False,
) -> tuple[dict[str, object], RegisteredModel]:
    """The rules a job request must pass before anything is stored, as job creation and the pre-flight
    estimate (api/preflight) apply them: what it trains on, its model (a base, or one of the organisation's
    tuned models), its files and its method (400s). Returns the method as stored and the registered base."""
    if body.compute is not None:
        check_compute(session, body.compute, _method(body)[1].training_type, max_devices, several_nodes)
    resolved = resolve_model(session, store, organization_id, body.model)
    if resolved is None:
        raise model_not_found(body.model)
    model, parent = resolved
    _check_file(session, organization_id, body.training_file, "training_file")
    if body.validation_file is not None:
        _check_file(session, organization_id, body.validation_file, "validation_file")
    return _check_method(session, store, organization_id, body, model, parent), model


def check_compute(
    session: Session,
    compute: Compute,
    training_type: str,
    max_devices: int | None,
    several_nodes: bool = False,
) -> None:
    """What this service can train one job on: one node unless a cluster executor allocates several
    (`several_nodes`, FTJOBS_EXECUTOR=slurm), a device class some worker has registered, at most the
    workers' devices (`max_devices`, when the API knows it), several devices only for a method that can
    spread over them (data-parallel or sharded) and several nodes only for a data-parallel one."""
    if compute.nodes > 1 and not several_nodes:
        raise APIError(
            "This service trains a job on one node (several need FTJOBS_EXECUTOR=slurm); "
            "compute.nodes must be 1.",
            param="compute.nodes",
        )
    if compute.device_class is not None:
        known = Workers(session).known_classes()
        if compute.device_class not in known:
            raise APIError(
                f"No worker has registered device class {compute.device_class!r} (known: "
                f"{', '.join(sorted(known)) or 'none'}); leave compute.device_class unset to run on any.",
                param="compute.device_class",
            )
    if max_devices is not None and compute.devices > max_devices:
        raise APIError(
            f"compute.devices is {compute.devices}, but the workers train a job on at most {max_devices}.",
            param="compute.devices",
        )
    parallel = METHODS[training_type].parallel
    if compute.devices > 1 and parallel == "single":
        raise APIError(
            f"A {training_type} job trains on one device; compute.devices must be 1 "
            "(docs/distributed.md says which methods run on several).",
            param="compute.devices",
        )
    if compute.nodes > 1 and parallel != "ddp":
        raise APIError(
            f"A {training_type} job trains on one node; compute.nodes must be 1 "
            "(docs/distributed.md says which methods run on several).",
            param="compute.nodes",
        )


def create(
    session: Session,
    store: ArtifactStore,
    dispatcher: Dispatcher,
    organization_id: str,
    body: JobCreate,
    max_active: int,
    max_devices: int | None = None,
    several_nodes: bool = False,
) -> Job:
    method, _ = check_request(session, store, organization_id, body, max_devices, several_nodes)
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
    check_budget(session, organization_id, now=time.time())
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
            publish=_publish(body),
            compute=body.compute.model_dump() if body.compute else None,
            devices=body.compute.devices if body.compute else 1,
            device_class=body.compute.device_class if body.compute else None,
            priority=body.priority,
            preemptible=body.preemptible,
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
    on_commit(session, lambda: dispatcher.submit(job.id, job.device_class))
    return job


def _publish(body: JobCreate) -> str:
    """Which weights the job publishes: the best checkpoint needs a validation file to rank them by."""
    if body.publish == "best" and body.validation_file is None:
        raise APIError(
            "publish 'best' ranks checkpoints by their evaluation on the validation file; give one, or "
            "publish 'last'.",
            param="publish",
        )
    return body.publish or ("best" if body.validation_file else "last")


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


def cancel(
    session: Session, organization_id: str, job_id: str, event: str = "Fine-tuning job cancelled"
) -> Job:
    """Cancel wins over whatever the runner does next: its own final write is a CAS from `running`. `event`:
    why, when not the client's own request (a sweep stopping a trial early)."""
    values = {"finished_at": int(time.time()), "estimated_finish": None}
    return _move(
        session,
        organization_id,
        job_id,
        from_=ACTIVE,
        to=JobStatus.CANCELLED,
        event=event,
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
    on_commit(session, lambda: dispatcher.submit(job.id, job.device_class))
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
