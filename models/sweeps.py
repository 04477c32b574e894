"""Hyperparameter sweeps (extension): a search space over a job's hyperparameters, tried by ordinary jobs.

Postgres is the source of truth. Each driver tick (`advance`) rebuilds an in-memory Optuna study from the
sweep's trials and their jobs, asks its pruner whether a running trial has fallen behind (successive
halving over the trials' evaluation curves), and asks its sampler for new trials while there is room.
Nothing Optuna holds outlives a tick, so any process may drive any sweep (a running trial is judged afresh
each tick, against every value the other trials had at the same number of evaluations); a row lock on the
sweep keeps two drivers from advancing it at once, and a unique trial number from adding a trial twice.
"""

import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.errors import APIError
from models.hyperparameters import (
    APPLIES_TO,
    HYPERPARAMETERS,
    RESOLVED,
    SupervisedHyperparameters,
    inapplicable_key,
)
from models.orm import Job, JobEvent, Sweep, SweepTrial
from models.pagination import page as seq_page
from models.spec import greater_is_better
from models.states import ACTIVE, JobStatus

log = logging.getLogger("ftjobs.sweeps")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial would flood the worker's log

PRUNED_REASON = "Fine-tuning job stopped early by the sweep: its evaluation curve fell behind the others'"
CANCELLED_REASON = "Fine-tuning job cancelled with its sweep"
NOT_KNOBS = frozenset({"metric_for_best_checkpoint", "lora_target_modules", "eval_steps"})
"""Fields a sweep may not vary: the metric its trials are compared by, a list-valued field, and how often
the curve the pruner reads is measured."""
REDUCTION_FACTOR = 2
"""Successive halving keeps the better half of the trials at each rung (1, 2, 4, … evaluations)."""


class SweepStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    FAILED = "failed"


class Range(BaseModel):
    """A numeric knob's interval, both ends included."""

    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    log: bool = False
    """Sample on a log scale (learning rates)."""
    step: float | None = None
    """Sample only low, low + step, …"""


Choices = list[str | int | float | bool]
SearchSpace = dict[str, Choices | Range]


class TrialJobs(Protocol):
    """How a driver creates and stops trial jobs: the same service code as the jobs API (every validation
    and quota applies), which lives above this layer."""

    def create(self, session: Session, organization_id: str, body: dict[str, Any]) -> Job: ...

    def cancel(self, session: Session, organization_id: str, job_id: str, reason: str) -> None: ...


def _is_numeric(knob: str) -> type[int] | type[float] | None:
    annotation = RESOLVED[knob].annotation if knob in RESOLVED else None
    return annotation if annotation in (int, float) else None


def distributions(method_type: str, base: dict[str, Any], space: SearchSpace) -> dict[str, BaseDistribution]:
    """Each knob's Optuna distribution, once every value it may take is one the method accepts: a 400 naming
    `search_space.<knob>` for an unknown knob, one the training type doesn't take, an empty list or range,
    or a value out of the knob's bounds."""
    model = HYPERPARAMETERS[method_type]
    if not space:
        raise APIError("search_space needs at least one knob to vary.", param="search_space")
    found: dict[str, BaseDistribution] = {}
    for knob, values in space.items():
        param = f"search_space.{knob}"
        if knob not in model.model_fields or knob in NOT_KNOBS:
            knobs = sorted(set(model.model_fields) - NOT_KNOBS)
            raise APIError(
                f"Unknown knob {knob!r}; a {method_type} sweep varies {', '.join(knobs)}.", param=param
            )
        if isinstance(values, Range):
            found[knob] = _range(knob, values, param)
            kind = int if isinstance(found[knob], IntDistribution) else float
            samples: list[Any] = [kind(values.low), kind(values.high)]
        else:
            if not values:
                raise APIError(f"{param} is an empty list; give at least one value.", param=param)
            found[knob] = CategoricalDistribution(values)
            samples = list(values)
        for i, value in enumerate(samples):
            try:
                model.model_validate({**base, knob: value})
            except ValidationError as error:
                where = param if isinstance(values, Range) else f"{param}[{i}]"
                reason = error.errors()[0]["msg"]
                raise APIError(f"Invalid {where}: {value!r}: {reason}.", param=where) from None
    _check_applicable(model, base, space)
    return found


def grid(space: SearchSpace) -> list[dict[str, Any]] | None:
    """A space of lists only is a grid: its points in the order given (the first knob's values vary
    slowest). Its trials take the points in turn, each once: every trial trains with the sweep's seed, so a
    point tried again would be the same job again. None when a knob is a range."""
    if any(isinstance(values, Range) for values in space.values()):
        return None
    return [dict(zip(space, point, strict=True)) for point in itertools.product(*space.values())]


def _range(knob: str, values: Range, param: str) -> BaseDistribution:
    kind = _is_numeric(knob)
    if kind is None:
        raise APIError(f"{knob} is not numeric; give a list of its values, not a range.", param=param)
    if values.low > values.high:
        raise APIError(f"{param}: low ({values.low:g}) is above high ({values.high:g}).", param=param)
    if values.low == values.high:
        raise APIError(f"{param} is an empty range (low = high); give a list for one value.", param=param)
    if values.log and values.low <= 0:
        raise APIError(f"{param}: a log range needs low above 0.", param=param)
    if values.log and values.step is not None:
        raise APIError(f"{param}: give log or step, not both.", param=param)
    if kind is int:
        if not all(float(v).is_integer() for v in (values.low, values.high, values.step or 1)):
            raise APIError(f"{knob} takes whole numbers: low, high and step must be integers.", param=param)
        return IntDistribution(int(values.low), int(values.high), log=values.log, step=int(values.step or 1))
    if values.step is not None and values.step <= 0:
        raise APIError(f"{param}: step must be above 0.", param=param)
    return FloatDistribution(values.low, values.high, log=values.log, step=values.step)


def _check_applicable(
    model: type[SupervisedHyperparameters], base: dict[str, Any], space: SearchSpace
) -> None:
    """Every knob must apply to every training type the sweep may try (e.g. no `lora_r` beside `full`)."""
    types = space.get("training_type")
    training_types = list(types) if isinstance(types, list) else [base.get("training_type", "lora")]
    for training_type in training_types:
        for knob in space:
            if knob in APPLIES_TO and training_type not in APPLIES_TO[knob]:
                applies_to = ", ".join(sorted(APPLIES_TO[knob]))
                raise APIError(
                    f"`{knob}` does not apply to training_type {training_type!r} (only to {applies_to}).",
                    param=f"search_space.{knob}",
                )
        hyperparameters = model.model_validate({**base, "training_type": training_type})
        if key := inapplicable_key(hyperparameters):
            raise APIError(
                f"`{key}` does not apply to training_type {training_type!r}.",
                param="search_space.training_type",
            )


def hyperparameters_key(body: dict[str, Any]) -> tuple[str, list[str]]:
    """The method type of a job create body and the path of its hyperparameters in it."""
    method = body.get("method")
    if method is None:
        return "supervised", ["hyperparameters"]
    return str(method["type"]), ["method", str(method["type"]), "hyperparameters"]


def base_hyperparameters(body: dict[str, Any]) -> dict[str, Any]:
    node: Any = body
    for key in hyperparameters_key(body)[1]:
        node = (node or {}).get(key)
    return dict(node or {})


def trial_body(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A trial's job create body: the sweep's base with the trial's parameters over its hyperparameters."""
    body = {**base}
    path = hyperparameters_key(base)[1]
    if path[0] == "method":
        method = {**body["method"]}
        settings = {**(method.get(path[1]) or {})}
        settings["hyperparameters"] = {**(settings.get("hyperparameters") or {}), **params}
        method[path[1]] = settings
        body["method"] = method
    else:
        body["hyperparameters"] = {**(body.get("hyperparameters") or {}), **params}
    return body


@dataclass(frozen=True)
class TrialView:
    number: int
    job_id: str
    params: dict[str, Any]
    status: str
    value: float | None
    pruned: bool
    fine_tuned_model: str | None


class SweepRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, sweep: Sweep) -> Sweep:
        self.session.add(sweep)
        self.session.flush()
        return sweep

    def get(self, sweep_id: str, organization_id: str | None = None) -> Sweep | None:
        stmt = select(Sweep).where(Sweep.id == sweep_id)
        if organization_id is not None:
            stmt = stmt.where(Sweep.organization_id == organization_id)
        return self.session.scalars(stmt).one_or_none()

    def lock(self, sweep_id: str, *, wait: bool) -> Sweep | None:
        """The sweep, row-locked until the transaction ends; None if another driver holds it (no `wait`)."""
        stmt = select(Sweep).where(Sweep.id == sweep_id).with_for_update(skip_locked=not wait)
        return self.session.scalars(stmt.execution_options(populate_existing=True)).one_or_none()

    def page(self, organization_id: str, *, after: Sweep | None, limit: int) -> tuple[Sequence[Sweep], bool]:
        stmt = select(Sweep).where(Sweep.organization_id == organization_id)
        return seq_page(self.session, stmt, Sweep.seq, after_seq=after.seq if after else None, limit=limit)

    def running_ids(self) -> Sequence[str]:
        return self.session.scalars(select(Sweep.id).where(Sweep.status == SweepStatus.RUNNING.value)).all()

    def trials(self, sweep_id: str) -> list[tuple[SweepTrial, Job]]:
        stmt = (
            select(SweepTrial, Job)
            .join(Job, Job.id == SweepTrial.job_id)
            .where(SweepTrial.sweep_id == sweep_id)
            .order_by(SweepTrial.number)
        )
        return [(trial, job) for trial, job in self.session.execute(stmt).tuples()]

    def curve(self, job_id: str, metric: str) -> list[float]:
        """The metric at each of the job's evaluations after the baseline, in order: the pruner's steps are
        evaluation numbers, so trials with other batch sizes or epochs line up."""
        stmt = (
            select(JobEvent.data)
            .where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
            .order_by(JobEvent.seq)
        )
        return [
            float(data[metric])
            for data in self.session.scalars(stmt)
            if data and data.get("step", 0) > 0 and isinstance(data.get(metric), int | float)
        ]


def final_value(job: Job, metric: str) -> float | None:
    """What a finished trial scored: the metric of the weights it published (the best checkpoint's when it
    publishes the best, else the last evaluation's)."""
    if job.status != JobStatus.SUCCEEDED.value:
        return None
    evaluation = job.evaluation or {}
    best = evaluation.get("best_checkpoint")
    if job.publish == "best" and best and best.get("metric") == metric:
        return float(best["value"])
    value = (evaluation.get("tuned") or {}).get("metrics", {}).get(metric)
    return float(value) if isinstance(value, int | float) else None


def views(session: Session, sweep: Sweep) -> list[TrialView]:
    metric = sweep.metric
    return [
        TrialView(
            number=trial.number,
            job_id=job.id,
            params=trial.params,
            status=job.status,
            value=final_value(job, metric) if metric else None,
            pruned=trial.pruned,
            fine_tuned_model=job.fine_tuned_model,
        )
        for trial, job in SweepRepository(session).trials(sweep.id)
    ]


def best(sweep: Sweep, trials: Sequence[TrialView]) -> TrialView | None:
    scored = [t for t in trials if t.value is not None and not math.isnan(t.value)]
    if not scored or sweep.metric is None:
        return None
    pick = max if greater_is_better(sweep.metric) else min
    return pick(scored, key=lambda t: t.value or 0.0)


def _learn_metric(sweep: Sweep, jobs: Sequence[Job]) -> None:
    """A sweep without a metric compares by its trials' metric_for_best_checkpoint, known once one starts."""
    if sweep.metric is None:
        for job in jobs:
            if job.hyperparameters is not None:
                sweep.metric = job.hyperparameters.metric_for_best_checkpoint
                return


def _finish(sweep: Sweep, status: SweepStatus, error: dict[str, Any] | None = None) -> None:
    sweep.status, sweep.finished_at, sweep.error = status.value, int(time.time()), error


def advance(session: Session, sweep: Sweep, jobs: TrialJobs) -> None:
    """One driver tick for a sweep the caller holds locked: prune, top up, or finish."""
    if sweep.status != SweepStatus.RUNNING.value:
        return
    repo = SweepRepository(session)
    rows = repo.trials(sweep.id)
    _learn_metric(sweep, [job for _, job in rows])
    space = {
        knob: Range.model_validate(v) if isinstance(v, dict) else v for knob, v in sweep.search_space.items()
    }
    method_type = hyperparameters_key(sweep.base)[0]
    dists = distributions(method_type, base_hyperparameters(sweep.base), space)
    metric = sweep.metric
    study = optuna.create_study(
        direction="maximize" if metric and greater_is_better(metric) else "minimize",
        # Reseeded by the trial count: a rebuilt study must not ask the first trial's question again.
        sampler=optuna.samplers.TPESampler(seed=(sweep.seed + len(rows)) % 2**32),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=REDUCTION_FACTOR),
    )
    # Finished trials first, so the running ones are judged against every rung the finished ones reached.
    active = 0
    for trial, job in sorted(rows, key=lambda row: (JobStatus(row[1].status) in ACTIVE, row[0].number)):
        study.enqueue_trial(trial.params)
        asked = study.ask(dists)
        running, prune = JobStatus(job.status) in ACTIVE, False
        for step, value in enumerate(repo.curve(job.id, metric) if metric else [], start=1):
            asked.report(value, step)
            # Asked at each evaluation, as a live study would have, so each rung holds the value it had then;
            # a finished trial's answer only records its rungs for the others to compete with.
            if sweep.early_stopping and asked.should_prune() and running:
                prune = True
                break
        if running:
            if not prune:
                active += 1
                continue
            jobs.cancel(session, sweep.organization_id, job.id, PRUNED_REASON)
            trial.pruned = True
            log.info("sweep %s: stopped trial %d (%s) early", sweep.id, trial.number, job.id)
        value = final_value(job, metric) if metric else None
        if trial.pruned:
            study.tell(asked, state=TrialState.PRUNED)
        elif value is not None:
            study.tell(asked, value)
        else:
            study.tell(asked, state=TrialState.FAIL)
    created = len(rows)
    tried = [trial.params for trial, _ in rows]
    untried = [point for point in grid(space) or [] if point not in tried]
    while active < sweep.parallelism and created < sweep.max_trials:
        if untried:
            study.enqueue_trial(untried.pop(0))
        asked = study.ask(dists)
        try:
            with session.begin_nested():  # a refused create leaves nothing of this trial behind
                job = jobs.create(session, sweep.organization_id, trial_body(sweep.base, asked.params))
                session.add(SweepTrial(sweep_id=sweep.id, number=created, job_id=job.id, params=asked.params))
        except APIError as error:
            if error.status_code == 429:  # the organisation's cap or budget: try again next tick
                return
            _finish(
                sweep,
                SweepStatus.FAILED,
                {"code": error.code, "message": error.message, "param": error.param},
            )
            for _, job in rows:
                if JobStatus(job.status) in ACTIVE:
                    jobs.cancel(session, sweep.organization_id, job.id, CANCELLED_REASON)
            return
        created += 1
        active += 1
    if created >= sweep.max_trials and active == 0:
        session.flush()
        if best(sweep, views(session, sweep)) is not None:
            _finish(sweep, SweepStatus.SUCCEEDED)
        else:
            message = f"No trial finished with a value of {metric or 'its metric'}."
            _finish(
                sweep, SweepStatus.FAILED, {"code": "no_successful_trial", "message": message, "param": None}
            )


def cancel(session: Session, sweep: Sweep, jobs: TrialJobs) -> None:
    """Cancel a running sweep's unfinished trials and the sweep; finished trials (and the best) stay."""
    if sweep.status != SweepStatus.RUNNING.value:
        raise APIError(f"Sweep {sweep.id} is {sweep.status}; only running sweeps can be cancelled.")
    for _, job in SweepRepository(session).trials(sweep.id):
        if JobStatus(job.status) in ACTIVE:
            jobs.cancel(session, sweep.organization_id, job.id, CANCELLED_REASON)
    _finish(sweep, SweepStatus.CANCELLED)
