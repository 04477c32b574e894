"""A job's trackers: W&B, MLflow and TensorBoard runs fed from the child's own event stream.

Each gets the resolved hyperparameters when it starts (after the learning-rate range test when the job asked
for one, so the config holds the rate it trains with; a job failing before its test has no run) and every
metric the child reports, at the step it reports it (the baseline evaluation at step 0), so a tracker's
curves are the job's own metrics. A tracker library is imported only when a job asks for it. A tracker
that fails to start or to log never fails the training: it is dropped with a warning event, and its
traceback goes to the trainer's log.
"""

import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

from models.spec import (
    ChildMessage,
    CompletedMessage,
    EvaluationMessage,
    LearningRateMessage,
    Metrics,
    MetricsMessage,
    MlflowTracker,
    StoppedMessage,
    TensorboardTracker,
    TrainingSpec,
    WandbTracker,
)
from worker.training.events import EventWriter

Outcome = Literal["succeeded", "failed", "stopped"]
"""How this attempt ended: it published, it raised, or the stop file ended it (a cancel or a pause)."""
JOB_ID_TAG = "ftjobs.job_id"
"""MLflow tag naming the job, so a later attempt (after a pause or a crash) continues the same run."""
MLFLOW_STATUS: dict[Outcome, str] = {"succeeded": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
TRACKER_NAMES = {"wandb": "W&B", "mlflow": "MLflow", "tensorboard": "TensorBoard"}


class Run(Protocol):
    def log(self, step: int, metrics: Metrics) -> None: ...

    def finish(self, outcome: Outcome) -> None: ...


class WandbRun:
    def __init__(self, target: WandbTracker, config: dict[str, Any], spec: TrainingSpec) -> None:
        import wandb

        Path(target.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=target.project,
            entity=target.entity,
            name=target.name,
            tags=target.tags,
            id=target.run_id,
            resume="allow",
            dir=target.dir,
            config=config,
            job_type="fine-tune",
            # No console capture (stderr is the trainer's log) and nothing about the worker's git checkout.
            settings=wandb.Settings(console="off", disable_git=True, silent=True),
        )

    def log(self, step: int, metrics: Metrics) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, outcome: Outcome) -> None:
        self.run.finish(exit_code=1 if outcome == "failed" else 0)


class MlflowRun:
    def __init__(self, target: MlflowTracker, config: dict[str, Any], spec: TrainingSpec) -> None:
        # MLflow fetches a telemetry config from the internet unless told not to; an operator may opt in.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=target.tracking_uri)
        experiment_id = self._experiment_id(target.experiment_name)
        earlier = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{spec.job_id}'", max_results=1
        )
        if earlier:
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {**target.tags, JOB_ID_TAG: spec.job_id}
            run = self.client.create_run(experiment_id, run_name=target.run_name, tags=tags)
            self.run_id = run.info.run_id
        # The same values again on a later attempt: MLflow accepts a parameter logged twice unchanged.
        self.client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in config.items()])

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        if (experiment := self.client.get_experiment_by_name(name)) is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another job created it since
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def log(self, step: int, metrics: Metrics) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key=name, value=value, timestamp=now, step=step) for name, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, outcome: Outcome) -> None:
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS[outcome])


class TensorboardRun:
    def __init__(self, target: TensorboardTracker, config: dict[str, Any], spec: TrainingSpec) -> None:
        import torch.utils.tensorboard  # noqa: F401 (fails here, at the start, without the tensorboard package)

        self.log_dir = Path(target.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)  # and so does an unusable directory
        self.config = config
        self.writer: Any = None

    def log(self, step: int, metrics: Metrics) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        if self.writer is None:
            # Opened at the first step this attempt logs: a resumed attempt purges what an earlier one
            # logged past the checkpoint it resumes from.
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step)
            # The HParams dashboard's entry, in the job's own directory (`add_hparams` would make another).
            plain = {k: v if isinstance(v, int | float | str) else str(v) for k, v in self.config.items()}
            for summary in hparams(plain, {}):
                self.writer.file_writer.add_summary(summary)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)

    def finish(self, outcome: Outcome) -> None:
        if self.writer is not None:
            self.writer.close()


RUNS: dict[str, Callable[[Any, dict[str, Any], TrainingSpec], Run]] = {
    "wandb": WandbRun,
    "mlflow": MlflowRun,
    "tensorboard": TensorboardRun,
}


class Trackers:
    """The job's tracker runs, receiving what the child emits; `with Trackers(spec, events):` around the
    training finishes each run with how it ended."""

    def __init__(self, spec: TrainingSpec, events: EventWriter) -> None:
        self.spec = spec
        self.events = events
        self.outcome: Outcome = "failed"
        self.runs: dict[str, Run] = {}
        if spec.trackers:
            events.tee(self.receive)
        if not spec.hyperparameters.learning_rate_search:
            self._start(spec.hyperparameters.model_dump())

    def _start(self, config: dict[str, Any]) -> None:
        for target in self.spec.trackers:
            try:
                self.runs[target.type] = RUNS[target.type](target, config, self.spec)
            except Exception as exc:
                self._warn(target.type, "start", exc)

    def receive(self, message: ChildMessage) -> None:
        if isinstance(message, LearningRateMessage):
            # A run's parameters can't change once logged (MLflow refuses): runs start with the rate found.
            found = self.spec.hyperparameters.with_learning_rate(
                message.learning_rate, message.learning_rate_multiplier
            )
            self._start(found.model_dump())
        elif isinstance(message, MetricsMessage):
            # A full evaluation at a training step is in this MetricsMessage too; only the baseline is not.
            self._each("log", lambda run: run.log(message.step, message.metrics))
        elif isinstance(message, EvaluationMessage) and message.baseline:
            self._each("log", lambda run: run.log(message.step, message.metrics))
        elif isinstance(message, CompletedMessage):
            self.outcome = "succeeded"
        elif isinstance(message, StoppedMessage):
            self.outcome = "stopped"

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._each("finish", lambda run: run.finish(self.outcome))

    def _each(self, action: str, call: Callable[[Run], None]) -> None:
        for name, run in list(self.runs.items()):
            try:
                call(run)
            except Exception as exc:
                del self.runs[name]
                self._warn(name, action, exc)

    def _warn(self, name: str, action: str, exc: Exception) -> None:
        traceback.print_exc()  # the details, for the operator, in the trainer's log
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        self.events.log(
            f"The {TRACKER_NAMES[name]} integration could not {action} and is off for the rest of this "
            f"attempt; training goes on. {detail}",
            level="warn",
        )
