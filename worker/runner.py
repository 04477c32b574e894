"""The job runner: one attempt of one job, the same code for the embedded and the Celery deployments.

It validates the job's files, claims the job with a compare-and-set (so duplicate wake-ups are
no-ops), runs training in a child process and turns the child's messages into fenced database
writes: every write applies only while the job is still `running` on this attempt, so a cancel or a
newer attempt always wins and nothing of a cancelled job is published.
"""

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from graders.grading import item_fields
from graders.shapes import parse_grader
from models import ids
from models.auth import Organizations
from models.db import session_scope
from models.files import FileRepository
from models.hyperparameters import HYPERPARAMETERS, SupervisedHyperparameters, resolve
from models.jobs import CompletedData, JobRepository, StartedData
from models.lineage import write_lineage
from models.logs import job_context
from models.objectives import Mismatch, check, objective_for
from models.orm import Job, JobCheckpoint
from models.quota import QuotaExceeded, StorageQuota, directory_bytes
from models.registry import ModelRegistry, is_generative
from models.settings import Settings
from models.spec import (
    CheckpointMessage,
    ChildMessage,
    CompletedMessage,
    EvaluationMessage,
    LogMessage,
    MetricsMessage,
    Objective,
    StartedMessage,
    StoppedMessage,
    TrainingSpec,
    greater_is_better,
)
from models.states import JobStatus, transition
from models.storage import ArtifactStore
from models.validation import DataError, FileSummary, validate_job_files
from worker.child import TrainingProcess, visible_devices
from worker.integrations import trackers
from worker.reconciler import retry_or_fail

log = logging.getLogger("ftjobs.worker")

T = TypeVar("T")


def organization_name(session: Session, job: Job) -> str:
    organization = Organizations(session).get(job.organization_id)
    return organization.name if organization else job.organization_id  # (jobs written without an org row)


def fine_tuned_model_name(session: Session, job: Job) -> str:
    """`ft:{base}:{org}:{suffix}:{id}`; the id part comes from the job id, so checkpoints share it."""
    org = organization_name(session, job)
    return f"ft:{job.model}:{org}:{job.suffix or ''}:{job.id.removeprefix('ftjob-')[:8]}"


class JobFailed(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.error = {"code": code, "message": message, "param": param}


class LeaseLost(Exception):
    """The database stayed unreachable longer than the lease: another attempt may own the job now."""


class JobRunner:
    def __init__(
        self, settings: Settings, session_factory: sessionmaker[Session], store: ArtifactStore
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.store = store

    def run(self, job_id: str) -> None:
        """Take `job_id` as far as it goes; returns quietly when another runner owns it."""
        with job_context(job_id):  # every log line of this run names the job
            self._run(job_id)

    def _run(self, job_id: str) -> None:
        try:
            data = self._validate(job_id)
            attempt = self._claim(job_id, data) if data else None
        except JobFailed as failure:
            fail_job(
                self.session_factory, job_id, failure, from_=(JobStatus.VALIDATING_FILES, JobStatus.QUEUED)
            )
            return
        if data and attempt:
            Attempt(self, job_id, attempt, data).run()

    def _validate(self, job_id: str) -> "JobData | None":
        """Check the files (read-only, so duplicate runners may both do it) and what the job trains on
        them; None if the job is not pending."""
        with session_scope(self.session_factory) as session:
            job = JobRepository(session).get(job_id)
            if job is None or job.status not in (JobStatus.VALIDATING_FILES, JobStatus.QUEUED):
                return None
            method_type = job.method["type"]
            requested = HYPERPARAMETERS[method_type].model_validate(
                job.method[method_type]["hyperparameters"]
            )
            model = ModelRegistry(session).get(job.model)
            generative = is_generative(model) if model else None
            files = [("training_file", job.training_file)]
            if job.validation_file:
                files.append(("validation_file", job.validation_file))
            grader = job.method[method_type].get("grader")
            paths = []
            for param, file_id in files:
                record = FileRepository(session).get(job.organization_id, file_id)
                if record is None:
                    raise JobFailed("file_not_found", f"File {file_id} no longer exists.", param)
                paths.append(self.store.local_path(record.storage_key))
        try:
            train, _ = validate_job_files(
                paths[0],
                paths[1] if len(paths) == 2 else None,
                max_examples=self.settings.max_file_examples,
                grader_fields=None if grader is None else list(item_fields(parse_grader(grader))),
            )
        except DataError as error:
            raise JobFailed(error.code, error.message, error.param) from error
        objective = objective_for(method_type, train.format)
        mismatch = (
            objective
            if isinstance(objective, Mismatch)
            else check(
                objective,
                training_type=requested.training_type,
                generative_base=generative,
                given=requested.given(),
                metric=requested.metric_for_best_checkpoint,
                where=f"method.{method_type}.hyperparameters",
            )
        )
        if mismatch:
            # The API refuses these at create time; a file replaced since then can still get here.
            raise JobFailed("invalid_file_format", mismatch.message, mismatch.param)
        assert not isinstance(objective, Mismatch)
        with session_scope(self.session_factory) as session:
            if transition(session, job_id, from_=JobStatus.VALIDATING_FILES, to=JobStatus.QUEUED):
                JobRepository(session).add_event(job_id, "Files validated, moving job to queued state")
        return JobData(train, objective, requested)

    def _claim(self, job_id: str, data: "JobData") -> int | None:
        """queued → running as attempt N+1, with the hyperparameters resolved; None if not ours."""
        with session_scope(self.session_factory) as session:
            job = JobRepository(session).get(job_id)
            if job is None or job.status != JobStatus.QUEUED:
                return None
            if ModelRegistry(session).get(job.model) is None:
                raise JobFailed("model_not_found", f"Model {job.model!r} is no longer registered.", "model")
            now = time.time()
            attempt = job.attempt + 1
            claimed = transition(
                session,
                job_id,
                from_=JobStatus.QUEUED,
                to=JobStatus.RUNNING,
                attempt=job.attempt,
                values={
                    "attempt": attempt,
                    "hyperparameters": resolve(data.requested, data.summary.n_examples, data.objective),
                    "started_at": int(now),
                    "lease_owner": f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}",
                    "heartbeat_at": now,
                    "lease_expires_at": now + self.settings.lease_seconds,
                },
            )
            if not claimed:
                return None
            JobRepository(session).add_event(job_id, "Fine-tuning job started", data=None)
            log.info("job %s: attempt %s started", job_id, attempt)
            return attempt


@dataclass(frozen=True)
class JobData:
    """What validation learnt about a job: its training file, the objective it implies, the request."""

    summary: FileSummary
    objective: Objective
    requested: SupervisedHyperparameters


def fail_job(
    session_factory: sessionmaker[Session],
    job_id: str,
    failure: JobFailed,
    *,
    from_: tuple[JobStatus, ...] | JobStatus,
    attempt: int | None = None,
) -> None:
    with session_scope(session_factory) as session:
        failed = transition(
            session,
            job_id,
            from_=from_,
            to=JobStatus.FAILED,
            attempt=attempt,
            values={"error": failure.error, "finished_at": int(time.time()), "estimated_finish": None},
        )
        if failed:
            JobRepository(session).add_event(job_id, failure.error["message"], level="error")
            log.warning("job %s failed (%s): %s", job_id, failure.error["code"], failure.error["message"])


class Attempt:
    """One run of the training child for a claimed job, and everything it reports."""

    def __init__(self, runner: JobRunner, job_id: str, attempt: int, data: JobData) -> None:
        self.runner, self.job_id, self.attempt, self.data = runner, job_id, attempt, data
        self.settings, self.store = runner.settings, runner.store
        self.workdir = self.settings.work_root / job_id / f"attempt-{attempt}"
        self.prefix = f"jobs/{job_id}/attempt-{attempt}"
        self.last_error: LogMessage | None = None
        self.lease_deadline = time.monotonic() + self.settings.lease_seconds

    def run(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        try:
            child = TrainingProcess(self._spec(), self.workdir)
            outcome = self._supervise(child)
            if outcome is None and child.process.returncode < 0:
                # Killed by a signal (the OOM killer, an operator): worth another attempt, unlike an error.
                self._db(
                    lambda: self._retry(
                        f"The trainer of attempt {self.attempt} was killed (signal "
                        f"{-child.process.returncode})"
                    )
                )
                return
            if not isinstance(outcome, CompletedMessage | StoppedMessage):
                error = self.last_error
                if error is not None and error.code is not None:
                    raise JobFailed(error.code, error.message, error.param)
                detail = (
                    (error and error.message) or child.log_tail(500) or "the trainer exited without a result"
                )
                raise JobFailed("training_failed", f"Training failed: {detail}")
            if isinstance(outcome, CompletedMessage):
                self._db(lambda: self._publish(outcome))
        except LeaseLost:
            # Writing anything now could clobber the next attempt; the reconciler takes it from here.
            log.error("job %s attempt %s lost its lease; abandoning it", self.job_id, self.attempt)
        except Exception as exc:
            if not isinstance(exc, JobFailed):  # a bug or a full disk must not leave the job running
                log.exception("job %s attempt %s crashed", self.job_id, self.attempt)
                exc = JobFailed("server_error", f"The worker failed while running the job: {exc}")
            fail_job(
                self.runner.session_factory, self.job_id, exc, from_=JobStatus.RUNNING, attempt=self.attempt
            )
        finally:
            log_file = self.workdir / "train.log"
            if log_file.exists():
                with open(log_file, "rb") as source:
                    self.store.put_stream(f"{self.prefix}/train.log", source)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _retry(self, reason: str) -> None:
        with session_scope(self.runner.session_factory) as session:
            job = JobRepository(session).get(self.job_id)
            if job is not None and job.status == JobStatus.RUNNING and job.attempt == self.attempt:
                retry_or_fail(session, job, reason, max_attempts=self.settings.max_attempts, now=time.time())

    def _spec(self) -> TrainingSpec:
        with session_scope(self.runner.session_factory) as session:
            job = JobRepository(session).get(self.job_id)
            assert job is not None and job.hyperparameters is not None
            files = FileRepository(session)
            training = files.get(job.organization_id, job.training_file)
            validation = files.get(job.organization_id, job.validation_file) if job.validation_file else None
            model = ModelRegistry(session).get(job.model)
            # A new attempt (after a crash or a pause) continues from the newest checkpoint of any attempt.
            latest = JobRepository(session).latest_checkpoint(job.id)
            if training is None or (job.validation_file and validation is None) or model is None:
                raise JobFailed("file_not_found", "A file or the base model of this job no longer exists.")
            devices = (job.compute or {}).get("devices", 1)
            available = self.settings.devices or visible_devices()
            if devices > available:
                raise JobFailed(
                    "invalid_compute",
                    f"compute.devices is {devices}, but this worker trains on at most {available}.",
                    "compute.devices",
                )
            return TrainingSpec(
                job_id=job.id,
                base_model_path=model.path,
                training_file=str(self.store.local_path(training.storage_key)),
                validation_file=str(self.store.local_path(validation.storage_key)) if validation else None,
                data_format=self.data.summary.format,
                objective=self.data.objective,
                labels=list(self.data.summary.labels),
                output_dir=str(self.workdir / "output"),
                stop_file=str(self.workdir / "STOP"),
                seed=job.seed,
                hyperparameters=job.hyperparameters,
                checkpoint_every_steps=self.settings.checkpoint_every_steps,
                resume_from=str(self.store.local_path(latest.storage_key)) if latest else None,
                export_merged=job.export_merged,
                max_training_tokens=self.settings.max_file_tokens,
                trackers=trackers(self.settings, job, organization_name(session, job)),
                devices=devices,
                grader=job.method[job.method["type"]].get("grader"),
            )

    def _supervise(self, child: TrainingProcess) -> ChildMessage | None:
        """Relay messages and heartbeat until the child exits; stop it if the job stops being ours."""
        outcome: ChildMessage | None = None
        next_beat = 0.0
        stop_deadline: float | None = None
        while not child.finished:
            try:
                for message in child.messages(timeout=0.5):
                    if isinstance(message, CompletedMessage | StoppedMessage):
                        outcome = message
                    elif not self._db(lambda m=message: self._record(m)):
                        stop_deadline = stop_deadline or self._stop(child)
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.settings.heartbeat_seconds
                    if stop_deadline is None and not self._db(lambda: self._fenced_update({})):
                        stop_deadline = self._stop(child)
            except LeaseLost:
                child.kill()  # self-fencing: a trainer without a lease must not keep the GPU or write
                raise
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                child.kill()
        return outcome

    def _db(self, action: Callable[[], T]) -> T:
        """Run a database write, riding out an outage for as long as this attempt's lease lasts."""
        while True:
            try:
                result = action()
            except OperationalError as error:
                if time.monotonic() > self.lease_deadline:
                    raise LeaseLost from error
                log.warning("job %s: database unavailable (%s); retrying", self.job_id, type(error).__name__)
                time.sleep(1)
                continue
            self.lease_deadline = time.monotonic() + self.settings.lease_seconds
            return result

    def _stop(self, child: TrainingProcess) -> float:
        """Stop a trainer whose job is no longer running here; a paused job gets a checkpoint first."""
        with session_scope(self.runner.session_factory) as session:
            job = JobRepository(session).get(self.job_id)
            pause = job is not None and job.status == JobStatus.PAUSED and job.attempt == self.attempt
        log.info("job %s attempt %s: stopping its trainer (pause: %s)", self.job_id, self.attempt, pause)
        child.request_stop(pause=pause)
        return time.monotonic() + self.settings.cancel_grace_seconds

    def _fenced_update(
        self, values: dict[str, Any], session: Session | None = None, *, paused_too: bool = False
    ) -> bool:
        """Heartbeat (plus `values`) only while the job is running on this attempt (or, with `paused_too`,
        was paused on it)."""
        if session is None:
            with session_scope(self.runner.session_factory) as own:
                return self._fenced_update(values, own, paused_too=paused_too)
        return JobRepository(session).renew_lease(
            self.job_id,
            self.attempt,
            now=time.time(),
            lease_seconds=self.settings.lease_seconds,
            paused_too=paused_too,
            values=values,
        )

    def _record(self, message: ChildMessage) -> bool:
        """Store one progress message; False when the job is no longer ours to write."""
        expired: Sequence[str] = ()
        with session_scope(self.runner.session_factory) as session:
            values: dict[str, Any] = {}
            if isinstance(message, MetricsMessage):
                remaining = message.elapsed_seconds / message.step * (message.total_steps - message.step)
                values["estimated_finish"] = int(time.time() + remaining)
            # The attempt that is being paused still reports its last steps and its pause checkpoint.
            if not self._fenced_update(values, session, paused_too=True):
                session.rollback()
                return False
            repo = JobRepository(session)
            if isinstance(message, MetricsMessage):
                if self._is_event_step(message):
                    repo.add_event(
                        self.job_id, _metrics_text(message), type="metrics", data=_metrics_data(message)
                    )
            elif isinstance(message, EvaluationMessage):
                self._save_evaluation(session, message)
            elif isinstance(message, CheckpointMessage):
                expired = self._save_checkpoint(session, message)
            elif isinstance(message, StartedMessage):
                repo.add_event(self.job_id, _started_text(message), data=StartedData.model_validate(message))
            elif isinstance(message, LogMessage):
                if message.level == "error":
                    self.last_error = message
                else:
                    repo.add_event(self.job_id, message.message, level=message.level)
        for key in expired:  # only once the rows that named them are gone for good
            self.store.delete(key)
        return True

    @staticmethod
    def _is_event_step(message: MetricsMessage) -> bool:
        """About a hundred metrics events per job: live enough for a progress bar, few enough to list."""
        every = max(1, message.total_steps // 100)
        return (
            message.step % every == 0
            or message.step == message.total_steps
            or any(key.startswith("full_valid") for key in message.metrics)
        )

    def _save_evaluation(self, session: Session, message: EvaluationMessage) -> None:
        """Keep the baseline and the latest evaluation on the job, and the gain between them."""
        repo = JobRepository(session)
        job = repo.get(self.job_id)
        assert job is not None and job.hyperparameters is not None
        evaluation = dict(job.evaluation or {})
        evaluation["metric"] = job.hyperparameters.metric_for_best_checkpoint
        result = {"step": message.step, "metrics": message.metrics, "details": message.details}
        evaluation["baseline" if message.baseline else "tuned"] = result
        if "baseline" in evaluation and "tuned" in evaluation:
            baseline, tuned = evaluation["baseline"]["metrics"], evaluation["tuned"]["metrics"]
            evaluation["gain"] = {name: tuned[name] - baseline[name] for name in tuned if name in baseline}
        job.evaluation = evaluation  # a new dict: the JSON column only notices assignment
        if message.baseline:
            repo.add_event(
                self.job_id,
                f"Baseline evaluation of {job.model} before training: {_metrics_summary(message.metrics)}",
                type="metrics",
                data={"step": 0, **message.metrics},
            )

    def _save_checkpoint(self, session: Session, message: CheckpointMessage) -> Sequence[str]:
        """Store and list a checkpoint, and name it the best if its metric beats the best so far; return
        the storage keys of those now beyond retention (never the best)."""
        key = f"{self.prefix}/checkpoints/step-{message.step}"
        repo = JobRepository(session)
        job = repo.get(self.job_id)
        assert job is not None and job.hyperparameters is not None
        write_lineage(session, job, self.data.objective, message.step, message.metrics, Path(message.path))
        self.store.put_dir(key, Path(message.path))
        name = f"{fine_tuned_model_name(session, job)}:ckpt-step-{message.step}"
        checkpoint = repo.add_checkpoint(
            JobCheckpoint(
                id=ids.checkpoint_id(),
                job_id=self.job_id,
                created_at=int(time.time()),
                step_number=message.step,
                metrics={"step": float(message.step), **message.metrics},
                fine_tuned_model_checkpoint=name,
                storage_key=key,
                bytes=directory_bytes(Path(message.path)),
            )
        )
        evaluation = dict(job.evaluation or {})
        metric = job.hyperparameters.metric_for_best_checkpoint
        best, value = evaluation.get("best_checkpoint"), message.metrics.get(metric)
        if value is not None and (best is None or _improves(metric, value, best["value"])):
            best = {"id": checkpoint.id, "step": message.step, "metric": metric, "value": value}
            best["fine_tuned_model_checkpoint"] = name
            job.evaluation = {**evaluation, "best_checkpoint": best}
        return repo.drop_old_checkpoints(
            self.job_id, keep=self.settings.checkpoint_retention, spare=best["id"] if best else None
        )

    def _publish(self, done: CompletedMessage) -> None:
        """Store the adapter and results, then succeed in one CAS; a lost race discards them."""
        adapter_key = f"{self.prefix}/adapter"
        merged_key = f"{self.prefix}/merged" if done.merged_path else None
        published = {adapter_key: done.adapter_path}
        if merged_key and done.merged_path:
            published[merged_key] = done.merged_path
        with session_scope(self.runner.session_factory) as session:
            job = JobRepository(session).get(self.job_id)
            assert job is not None
            for path in published.values():
                write_lineage(session, job, self.data.objective, done.step, done.metrics, Path(path))
        for key, path in published.items():
            self.store.put_dir(key, Path(path))
        results_key = None
        artifact_bytes = sum(directory_bytes(Path(path)) for path in published.values())
        adding = artifact_bytes + directory_bytes(Path(done.results_csv))
        with session_scope(self.runner.session_factory) as session:
            job = JobRepository(session).get(self.job_id)
            assert job is not None
            self._reserve_storage(session, job, published, adding)
            with open(done.results_csv, "rb") as csv:
                results = FileRepository(session).store(
                    self.store,
                    organization_id=job.organization_id,
                    source=csv,
                    filename="step_metrics.csv",
                    purpose="fine-tune-results",
                )
            results_key = results.storage_key
            name = fine_tuned_model_name(session, job)
            succeeded = transition(
                session,
                self.job_id,
                from_=JobStatus.RUNNING,
                to=JobStatus.SUCCEEDED,
                attempt=self.attempt,
                values={
                    "fine_tuned_model": name,
                    "trained_tokens": done.trained_tokens,
                    "result_files": [results.id],
                    "adapter_key": adapter_key,
                    "merged_key": merged_key,
                    "artifact_bytes": artifact_bytes,
                    "finished_at": int(time.time()),
                    "estimated_finish": None,
                },
            )
            if succeeded:
                log.info("job %s succeeded: %s", self.job_id, name)
                repo = JobRepository(session)
                repo.add_event(self.job_id, f"New fine-tuned model created: {name}")
                repo.add_event(
                    self.job_id, "The job has successfully completed", data=CompletedData.model_validate(done)
                )
                return
            session.rollback()
            # A retry after a commit whose reply was lost finds its own success: keep what it published.
            now = JobRepository(session).get(self.job_id)
            ours = now is not None and (now.status, now.attempt) == (JobStatus.SUCCEEDED, self.attempt)
        self.store.delete(results_key)
        if not ours:
            for key in published:
                self.store.delete(key)

    def _reserve_storage(self, session: Session, job: Job, published: Iterable[str], adding: int) -> None:
        """Fail the job, discarding what it stored, if its artifacts don't fit its organisation's quota."""
        if (job.status, job.attempt) != (JobStatus.RUNNING, self.attempt):
            return  # not ours any more, or a retried publish that already succeeded: the CAS sorts it out
        try:
            StorageQuota(session, self.settings.storage_quota_bytes).reserve(job.organization_id, adding)
        except QuotaExceeded as exc:
            for key in published:
                self.store.delete(key)
            raise JobFailed(exc.code, f"The fine-tuned model was not published: {exc}") from exc


def _improves(metric: str, value: float, best: float) -> bool:
    return value > best if greater_is_better(metric) else value < best


def _metrics_summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name.removeprefix('full_valid_')}={value:.4f}" for name, value in metrics.items())


def _started_text(message: StartedMessage) -> str:
    where = f" on {message.device.name}" if message.device else ""
    return f"Training {message.n_train_examples} examples in {message.total_steps} steps{where}"


def _metrics_text(message: MetricsMessage) -> str:
    metrics = message.metrics
    text = f"Step {message.step}/{message.total_steps}: training loss={metrics['train_loss']:.4f}"
    if "valid_loss" in metrics:
        text += f", validation loss={metrics['valid_loss']:.4f}"
    if "full_valid_loss" in metrics:
        text += f", full validation loss={metrics['full_valid_loss']:.4f}"
    return text


def _metrics_data(message: MetricsMessage) -> dict[str, float]:
    return {"step": message.step, "total_steps": message.total_steps, **message.metrics}
