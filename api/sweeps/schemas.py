"""Sweep shapes (extension): a job create body plus what to search, and the sweep with its trials."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from api.jobs.schemas import JobCreate
from models.orm import Sweep
from models.spec import greater_is_better
from models.sweeps import Choices, Range, SweepStatus, TrialView, best

SWEEP_FIELDS = frozenset({"search_space", "max_trials", "metric", "parallelism", "early_stopping"})
"""The keys a sweep adds to a job create body; the rest is every trial's base."""


class SweepCreate(JobCreate):
    """A fine-tuning job create body (every trial's base) and the search over its hyperparameters."""

    search_space: dict[str, Choices | Range]
    """Each knob to vary (a key of the method's hyperparameters): a list of values, or a numeric range
    `{"low", "high", "log"?, "step"?}`."""
    max_trials: Annotated[int, Field(strict=True, ge=1)]
    """How many trials (jobs) to run in all; at most the organisation's active-job cap."""
    metric: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    """What ranks the trials (default: the jobs' metric_for_best_checkpoint); needs a validation file."""
    parallelism: Annotated[int, Field(strict=True, ge=1, le=64)] = 2
    """How many trials run at once."""
    early_stopping: Annotated[bool, Field(strict=True)] = True
    """Cancel trials whose evaluation curve falls behind the others' (successive halving)."""

    def base(self) -> dict[str, Any]:
        """The job create body every trial starts from, as the client gave it."""
        return self.model_dump(mode="json", exclude_unset=True, exclude=set(SWEEP_FIELDS))


class SweepTrial(BaseModel):
    job_id: str
    params: dict[str, Any]
    status: str
    """The trial job's status."""
    value: float | None
    """Its metric, once it has succeeded."""
    pruned: bool
    """Stopped early by the sweep."""


class SweepBest(BaseModel):
    job_id: str
    params: dict[str, Any]
    value: float
    fine_tuned_model: str | None


class SweepError(BaseModel):
    code: str | None
    message: str
    param: str | None = None


class FineTuningSweep(BaseModel):
    id: str
    object: Literal["fine_tuning.sweep"] = "fine_tuning.sweep"
    status: SweepStatus
    metric: str | None
    """None until the first trial has resolved its metric_for_best_checkpoint."""
    direction: Literal["minimize", "maximize"] | None
    search_space: dict[str, Any]
    max_trials: int
    parallelism: int
    early_stopping: bool
    seed: int
    trials: list[SweepTrial]
    best: SweepBest | None
    error: SweepError | None
    created_at: int
    finished_at: int | None

    @classmethod
    def of(cls, sweep: Sweep, trials: list[TrialView]) -> "FineTuningSweep":
        winner = best(sweep, trials)
        direction: Literal["minimize", "maximize"] | None = None
        if sweep.metric is not None:
            direction = "maximize" if greater_is_better(sweep.metric) else "minimize"
        return cls(
            id=sweep.id,
            status=SweepStatus(sweep.status),
            metric=sweep.metric,
            direction=direction,
            search_space=sweep.search_space,
            max_trials=sweep.max_trials,
            parallelism=sweep.parallelism,
            early_stopping=sweep.early_stopping,
            seed=sweep.seed,
            trials=[
                SweepTrial(job_id=t.job_id, params=t.params, status=t.status, value=t.value, pruned=t.pruned)
                for t in trials
            ],
            best=SweepBest(
                job_id=winner.job_id,
                params=winner.params,
                value=winner.value,
                fine_tuned_model=winner.fine_tuned_model,
            )
            if winner is not None and winner.value is not None
            else None,
            error=SweepError(**sweep.error) if sweep.error else None,
            created_at=sweep.created_at,
            finished_at=sweep.finished_at,
        )
