"""Sweep rules: what may be created, listed and cancelled, and the driver loop the reconciler runs. Trials are
created and cancelled by the jobs service itself, so every job rule, cap and budget applies to them."""

import logging
import random
import time
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from api.jobs import service as job_service
from api.jobs.schemas import JobCreate
from api.pagination import cursor
from api.sweeps.schemas import SweepCreate
from models import ids
from models.db import session_scope
from models.errors import APIError, not_found
from models.objectives import metric_name
from models.orm import Job, Sweep
from models.queue import Dispatcher
from models.settings import Settings
from models.storage import ArtifactStore
from models.sweeps import (
    SweepRepository,
    SweepStatus,
    advance,
    base_hyperparameters,
    distributions,
    grid,
    hyperparameters_key,
    trial_body,
)
from models.sweeps import cancel as cancel_sweep

log = logging.getLogger("ftjobs.sweeps")


class ServiceTrialJobs:
    """`models.sweeps.TrialJobs` through the jobs service: a trial is created and cancelled as a client's
    job would be."""

    def __init__(self, settings: Settings, store: ArtifactStore, dispatcher: Dispatcher) -> None:
        self.settings, self.store, self.dispatcher = settings, store, dispatcher

    def create(self, session: Session, organization_id: str, body: dict[str, Any]) -> Job:
        try:
            request = JobCreate.model_validate(body)
        except ValidationError as error:
            first = error.errors()[0]
            param = ".".join(str(part) for part in first["loc"])
            raise APIError(f"Invalid trial: {param}: {first['msg']}.", param=param) from None
        return job_service.create(
            session,
            self.store,
            self.dispatcher,
            organization_id,
            request,
            self.settings.max_active_jobs,
            self.settings.devices,
            several_nodes=self.settings.executor == "slurm",
        )

    def cancel(self, session: Session, organization_id: str, job_id: str, reason: str) -> None:
        try:
            job_service.cancel(session, organization_id, job_id, event=reason)
        except APIError:  # it finished in the meantime: nothing to stop
            pass


def _with_metric(body: SweepCreate, base: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The base with the sweep's metric as its trials' metric_for_best_checkpoint (so each trial publishes
    its best checkpoint by what the sweep compares), and that metric (None: the objective's default)."""
    given = base_hyperparameters(base).get("metric_for_best_checkpoint")
    if body.metric is None:
        return base, metric_name(given) if given else None
    if given is not None and metric_name(given) != metric_name(body.metric):
        raise APIError(
            f"metric is {body.metric!r} but the job's metric_for_best_checkpoint is {given!r}; give one.",
            param="metric",
        )
    with_metric = trial_body(base, {"metric_for_best_checkpoint": body.metric})
    return with_metric, metric_name(body.metric)


def create(session: Session, jobs: ServiceTrialJobs, organization_id: str, body: SweepCreate) -> Sweep:
    """Check the sweep, store it and create its first trials in the same transaction."""
    if body.validation_file is None:
        raise APIError(
            "A sweep ranks its trials by their evaluation: give a validation_file.", param="validation_file"
        )
    cap = jobs.settings.max_active_jobs
    if body.max_trials > cap:
        raise APIError(
            f"max_trials is {body.max_trials}, over the organization's {cap} unfinished jobs at once.",
            param="max_trials",
        )
    base, metric = _with_metric(body, body.base())
    method_type, _ = hyperparameters_key(base)
    distributions(method_type, base_hyperparameters(base), body.search_space)
    points = grid(body.search_space)
    if points is not None and body.max_trials > len(points):
        raise APIError(
            f"max_trials is {body.max_trials}, over the {len(points)} points of a search space of lists only "
            "(each is tried once).",
            param="max_trials",
        )
    job_service.check_request(session, jobs.store, organization_id, JobCreate.model_validate(base))
    sweep = SweepRepository(session).add(
        Sweep(
            id=ids.sweep_id(),
            organization_id=organization_id,
            status=SweepStatus.RUNNING.value,
            base=base,
            search_space={
                knob: value if isinstance(value, list) else value.model_dump(exclude_none=True)
                for knob, value in body.search_space.items()
            },
            metric=metric,
            max_trials=body.max_trials,
            parallelism=body.parallelism,
            early_stopping=body.early_stopping,
            seed=body.seed if body.seed is not None else random.randint(0, 2147483647),
            created_at=int(time.time()),
        )
    )
    advance(session, sweep, jobs)
    if sweep.status == SweepStatus.FAILED.value and sweep.error:  # its first trial was refused: say why
        raise APIError(sweep.error["message"], param=sweep.error.get("param"), code=sweep.error.get("code"))
    return sweep


def get(session: Session, organization_id: str, sweep_id: str) -> Sweep:
    """Another organisation's sweep is as missing as one that does not exist."""
    sweep = SweepRepository(session).get(sweep_id, organization_id)
    if sweep is None:
        raise not_found("sweep", sweep_id, "sweep_id")
    return sweep


def list_sweeps(
    session: Session, organization_id: str, *, after: str | None, limit: int
) -> tuple[list[Sweep], bool]:
    repo = SweepRepository(session)
    start = cursor(after, lambda sweep_id: repo.get(sweep_id, organization_id), "sweep")
    rows, has_more = repo.page(organization_id, after=start, limit=limit)
    return list(rows), has_more


def cancel(session: Session, jobs: ServiceTrialJobs, organization_id: str, sweep_id: str) -> Sweep:
    sweep = SweepRepository(session).lock(get(session, organization_id, sweep_id).id, wait=True)
    assert sweep is not None
    cancel_sweep(session, sweep, jobs)
    session.flush()
    return sweep


def drive(session_factory: sessionmaker[Session], jobs: ServiceTrialJobs) -> list[str]:
    """One driver tick over every running sweep, each in its own transaction; a sweep another driver holds
    is skipped (it is being advanced). Returns the sweeps advanced."""
    with session_scope(session_factory) as session:
        running = list(SweepRepository(session).running_ids())
    advanced: list[str] = []
    for sweep_id in running:
        try:
            with session_scope(session_factory) as session:
                sweep = SweepRepository(session).lock(sweep_id, wait=False)
                if sweep is None:
                    continue
                advance(session, sweep, jobs)
            for action in session.info.get("on_commit", []):  # the new trials' wake-ups, once committed
                action()
            advanced.append(sweep_id)
        except Exception:  # one sweep's trouble must not stall the others; the next tick tries again
            log.exception("sweep %s: driver tick failed", sweep_id)
    return advanced
