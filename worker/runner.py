"""The job runner: one attempt of one job, the same code for the embedded and the Celery deployments.

It validates the job's files, claims the job with a compare-and-set (so duplicate wake-ups are
no-ops), runs training in a child process and turns the child's messages into fenced database
writes: every write applies only while the job is still `running` on this attempt, so a cancel or a
newer attempt always wins and nothing of a cancelled job is published.

Where the claimed attempt trains is the executor's choice (worker/executors.py): here, or on the nodes of
a Slurm allocation, where `ftjobs run-attempt` runs this same `Attempt` on every node (`run_attempt`).
"""

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from graders.grading import item_fields
from graders.shapes import parse_grader
from models import ids, judge_grants
from models.auth import Organizations
from models.base_store import local_base
from models.continuation import Parent, how_to_start, resolve_model
from models.db import session_scope
from models.errors import APIError
from models.files import FileRepository
from models.hyperparameters import HYPERPARAMETERS, SupervisedHyperparameters, resolve
from models.inference import Target
from models.jobs import CompletedData, JobRepository, StartedData
from models.lineage import Lineage, renamed_metadata, write_lineage
from models.logs import job_context
from models.objectives import Mismatch, check, objective_for
from models.orm import Job, JobCheckpoint
from models.quota import QuotaExceeded, StorageQuota, directory_bytes
from models.registry import ModelRegistry, is_generative
from models.scheduling import Capacity, Scheduler, Usage
from models.settings import Settings
from models.spec import (
    CheckpointMessage,
    ChildMessage,
    CompletedMessage,
    EvaluationMessage,
    JudgeAccess,
    LearningRateMessage,
    LogMessage,
    Metrics,
    MetricsMessage,
    Objective,
    ResolvedHyperparameters,
    StartedMessage,
    StartFrom,
    StoppedMessage,
    TrainingSpec,
    greater_is_better,
)
from models.states import JobStatus, transition
from models.storage import ArtifactStore, StoreUnavailable
from models.targets import judge_targets
from models.validation import DataError, FileSummary, validate_job_files
from models.versions import root_base
from worker.child import Placement, TrainingProcess, visible_device_class, visible_devices
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
    return f"ft:{root_base(job.model)}:{org}:{job.suffix or ''}:{job.id.removeprefix('ftjob-')[:8]}"


class JobFailed(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.error = {"code": code, "message": message, "param": param}


class LeaseLost(Exception):
    """The database stayed unreachable longer than the lease: another attempt may own the job now."""


class Executor(Protocol):
    """Where a claimed attempt trains (worker/executors.py)."""

    def start(self, attempt: "Attempt") -> None: ...


class LocalExecutor:
    """`FTJOBS_EXECUTOR=local`, the default: the attempt's trainer is a child process of this one (the
    launcher's ranks, with several devices)."""

    def start(self, attempt: "Attempt") -> None:
        attempt.run()


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        store: ArtifactStore,
        executor: Executor | None = None,
        capacity: Capacity | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.store = store
        self.executor = executor or LocalExecutor()
        self.capacity = capacity or worker_capacity(settings)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, job_id: str) -> int:
        """Validate `job_id`'s files if it waits for that, then train what this worker claims, one job
        after another, until no queued job fits it (the woken job or any other: a message is a wake-up).
        Each job once: one requeued by its attempt waits for the next wake-up, as a retry should. Returns
        how many attempts it ran."""
        with job_context(job_id):  # every log line of this run names the job
            try:
                self._validate(job_id, JobStatus.VALIDATING_FILES)
            except JobFailed as failure:
                fail_job(self.session_factory, job_id, failure, from_=JobStatus.VALIDATING_FILES)
        ran: set[str] = set()
        while (done := self.run_next(skip=ran)) is not None:
            ran.add(done)
        return len(ran)

    def run_next(self, skip: Iterable[str] = ()) -> str | None:
        """Claim the next job that fits this worker (but those in `skip`) and start an attempt of it where
        the executor trains it; its id, or None if none fits."""
        claimed = self._claim(skip)
        if claimed is None:
            return None
        job_id, attempt = claimed
        with job_context(job_id):
            try:
                data = self._validate(job_id, JobStatus.RUNNING, attempt)
                if data is None:  # cancelled or paused since the claim: nothing to train
                    return job_id
                self._start(job_id, attempt, data)
            except JobFailed as failure:
                fail_job(self.session_factory, job_id, failure, from_=JobStatus.RUNNING, attempt=attempt)
                return job_id
            self.executor.start(Attempt(self, job_id, attempt, data))
        return job_id

    def run_attempt(self, job_id: str, attempt: int, placement: Placement | None = None) -> bool:
        """Train attempt `attempt` of `job_id`, claimed by another process (`ftjobs run-attempt` on each node
        of a Slurm allocation); False, doing nothing, when the job no longer runs on that attempt."""
        with job_context(job_id):
            try:
                data = self._validate(job_id, JobStatus.RUNNING, attempt)
            except JobFailed as failure:
                fail_job(self.session_factory, job_id, failure, from_=JobStatus.RUNNING, attempt=attempt)
                return False
            if data is None:
                log.info("job %s: attempt %s is not running; nothing to do", job_id, attempt)
                return False
            Attempt(self, job_id, attempt, data, placement).run()
            return True

    def _validate(self, job_id: str, status: JobStatus, attempt: int | None = None) -> "JobData | None":
        """Check the files of a job in `status` (and on `attempt`, if given) and what the job trains on them
        (read-only, so duplicate runners may both do it); None if the job is not there. A job validating
        its files is queued."""
        with session_scope(self.session_factory) as session:
            job = JobRepository(session).get(job_id)
            if job is None or job.status != status or attempt not in (None, job.attempt):
                return None
            method_type = job.method["type"]
            requested = HYPERPARAMETERS[method_type].model_validate(
                job.method[method_type]["hyperparameters"]
            )
            model = ModelRegistry(session).get(root_base(job.model))
            if model is None:
                raise JobFailed("model_not_found", f"Model {job.model!r} is no longer registered.", "model")
            generative = is_generative(model)
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

    def _claim(self, skip: Iterable[str]) -> tuple[str, int] | None:
        """queued → running: the next job that fits this worker, as its attempt N+1; None if none fits."""
        with session_scope(self.session_factory) as session:
            now = time.time()
            job = Scheduler(session, window_seconds=self.settings.fair_share_window_seconds).claim_next(
                self.worker_id,
                self.capacity,
                now=now,
                values={
                    "lease_owner": f"{self.worker_id}:{threading.get_ident()}",
                    "lease_expires_at": now + self.settings.lease_seconds,
                },
                skip=skip,
            )
            if job is None:
                return None
            JobRepository(session).add_event(job.id, "Fine-tuning job started", data=None)
            log.info("job %s: attempt %s started on %s", job.id, job.attempt, self.worker_id)
            return job.id, job.attempt

    def _start(self, job_id: str, attempt: int, data: "JobData") -> None:
        """Write the claimed attempt's resolved hyperparameters (fenced: a cancel may have come first)."""
        resolved = resolve(data.requested, data.summary.n_examples, data.objective)
        with session_scope(self.session_factory) as session:
            repo = JobRepository(session)
            job = repo.get(job_id)
            earlier = job.hyperparameters if job else None
            if resolved.learning_rate_search and earlier is not None and not earlier.learning_rate_search:
                # An earlier attempt's range test found the rate: a resumed or retried job keeps it.
                resolved = resolved.with_learning_rate(
                    earlier.learning_rate, earlier.learning_rate_multiplier
                )
            repo.renew_lease(
                job_id,
                attempt,
                now=time.time(),
                lease_seconds=self.settings.lease_seconds,
                values={"hyperparameters": resolved},
            )


def worker_capacity(settings: Settings) -> Capacity:
    """This worker's devices and their class: as configured, else the GPUs it sees (or 1 CPU device)."""
    return Capacity(settings.devices or visible_devices(), settings.device_class or visible_device_class())


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
    """One run of the training child for a claimed job, and everything it reports.

    On one node of several (`placement`), the node whose launcher got global rank 0 hears the trainer's
    messages and does what a single node does; the others only train, heartbeat and stop with the job."""

    def __init__(
        self, runner: JobRunner, job_id: str, attempt: int, data: JobData, placement: Placement | None = None
    ) -> None:
        self.runner, self.job_id, self.attempt, self.data = runner, job_id, attempt, data
        self.placement = placement
        self.settings, self.store = runner.settings, runner.store
        node = f"-node-{placement.node_rank}" if placement else ""  # nodes may share a machine
        self.workdir = self.settings.work_root / job_id / f"attempt-{attempt}{node}"
        self.prefix = f"jobs/{job_id}/attempt-{attempt}"
        self.log_key = f"{self.prefix}/train{node}.log"
        self.last_error: LogMessage | None = None
        self.parent: Lineage | None = None
        """The lineage of the tuned model the job started from (set with the spec)."""
        self.heard = False
        self.lease_deadline = time.monotonic() + self.settings.lease_seconds
        self.judges: tuple[str, list[Target]] | None = None
        """The organisation and judge targets the trainer's grant names, when the job has judges and the
        inference server a token (set with the spec)."""
        self.base_renames: dict[str, str] = {}
        """The base's directory on this machine (a cache entry, with object storage) by its registered path:
        saving records the former, published artifacts the latter, wherever they were trained."""

    def run(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        try:
            spec = self._db(self._spec)
            self._renew_grant()
            child = TrainingProcess(spec, self.workdir, self.placement)
            outcome = self._supervise(child)
            if outcome is None and child.process.returncode < 0:
                # Killed by a signal (the OOM killer, an operator): worth another attempt, unlike an error.
                self._db(
                    lambda: self.retry(
                        f"The trainer of attempt {self.attempt} was killed (signal "
                        f"{-child.process.returncode})"
                    )
                )
                return
            if self.placement and not self.heard:
                # Rank 0 trained on another node, whose runner judges the attempt and publishes.
                log.info("job %s attempt %s: this node's ranks ended", self.job_id, self.attempt)
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
            elif isinstance(outcome, StoppedMessage):
                self._db(lambda: self._record_pause(outcome))
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
            self._settle_usage()
            log_file = self.workdir / "train.log"
            if log_file.exists():
                with open(log_file, "rb") as source, suppress(StoreUnavailable):  # only the log
                    self.store.put_stream(self.log_key, source)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _settle_usage(self) -> None:
        """Count the devices' time since the last heartbeat towards the job's usage."""
        try:
            with session_scope(self.runner.session_factory) as session:
                Usage(session).settle(self.job_id, self.attempt, now=time.time())
        except OperationalError:  # the database is down: the job's usage misses a heartbeat's worth
            log.warning("job %s: could not count its last device time", self.job_id)

    def retry(self, reason: str) -> None:
        """Queue the job's next attempt (or fail it once they are spent), if it still runs on this one."""
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
            resolved = resolve_model(session, self.store, job.organization_id, job.model)
            if resolved is None:
                raise JobFailed("model_not_found", f"Model {job.model!r} no longer exists.", "model")
            model, parent = resolved
            # A new attempt (after a crash or a pause) continues from the newest checkpoint of any attempt.
            latest = JobRepository(session).latest_checkpoint(job.id)
            if training is None or (job.validation_file and validation is None):
                raise JobFailed("file_not_found", "A file or the base model of this job no longer exists.")
            devices, nodes = (job.compute or {}).get("devices", 1), (job.compute or {}).get("nodes", 1)
            if nodes != (self.placement.nodes if self.placement else 1):
                raise JobFailed(
                    "invalid_compute",
                    f"compute.nodes is {nodes}, but this worker trains a job on one node (several need "
                    "FTJOBS_EXECUTOR=slurm on the workers as on the API).",
                    "compute.nodes",
                )
            available = self.settings.devices or visible_devices()
            if devices > available:
                raise JobFailed(
                    "invalid_compute",
                    f"compute.devices is {devices}, but this worker trains on at most {available}.",
                    "compute.devices",
                )
            base_path = local_base(self.store, model.path, model.content_hash)
            self.base_renames = {base_path: model.path} if base_path != model.path else {}
            base_model_path, start_from = self._start(base_path, parent, job.hyperparameters)
            return TrainingSpec(
                job_id=job.id,
                base_model_path=base_model_path,
                start_from=start_from,
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
                publish_best=job.publish == "best",
                best_checkpoint=self._best_checkpoint(session, job),
                max_training_tokens=self.settings.max_file_tokens,
                trackers=trackers(self.settings, job, organization_name(session, job)),
                devices=devices,
                grader=job.method[job.method["type"]].get("grader"),
                judge=self._judge(session, job),
            )

    def _judge(self, session: Session, job: Job) -> JudgeAccess | None:
        """Where the job's judge models answer, with a grant for them alone: the trainer never holds the
        inference token, which would reach any organisation's models."""
        grader = job.method[job.method["type"]].get("grader")
        if grader is None:
            return None
        try:  # checked at create; a judge deleted or made unservable since fails the job
            targets = judge_targets(
                session, self.store, job.organization_id, parse_grader(grader), "method.reinforcement.grader"
            )
        except APIError as error:
            raise JobFailed(error.code or "model_not_found", error.message, error.param) from error
        if not targets:
            return None
        if self.settings.inference_token is not None:
            self.judges = (job.organization_id, [*targets.values()])
        return JudgeAccess(
            url=self.settings.inference_url,
            grant_file=str(self.workdir / judge_grants.FILE) if self.judges else None,
            organization=job.organization_id,
            targets={name: found.model_dump(mode="json") for name, found in targets.items()},
        )

    def _renew_grant(self) -> None:
        """Sign the trainer's judge grant afresh, valid for a lease: renewed with every heartbeat, it lapses
        soon after the attempt ends, so a copy read from its files is of no use for long."""
        token = self.settings.inference_token
        if self.judges is None or token is None:
            return
        organization, targets = self.judges
        expires = time.time() + self.settings.lease_seconds
        grant = judge_grants.sign(token.get_secret_value(), organization, targets, expires=expires)
        judge_grants.write(self.workdir / judge_grants.FILE, grant)

    def _best_checkpoint(self, session: Session, job: Job) -> str | None:
        """Where the best checkpoint of earlier attempts is, for a resumed job that publishes the best."""
        best = (job.evaluation or {}).get("best_checkpoint")
        checkpoint = JobRepository(session).get_checkpoint(job.id, best["id"]) if best else None
        return str(self.store.local_path(checkpoint.storage_key)) if checkpoint else None

    def _start(
        self, base_path: str, parent: Parent | None, hyperparameters: ResolvedHyperparameters
    ) -> tuple[str, StartFrom | None]:
        """The base directory the trainer loads, and the tuned weights it starts from (none for a base
        model; a fully tuned model is itself the base)."""
        self.parent = parent.lineage if parent else None
        if parent is None:
            return base_path, None
        path = str(self.store.local_path(parent.artifact_key))
        start = how_to_start(parent.hyperparameters, hyperparameters)
        if start == "whole":
            return path, None
        if start == "continue" or start == "merge":
            return base_path, StartFrom(path=path, mode=start)
        raise JobFailed("invalid_model", start, "model")

    def _supervise(self, child: TrainingProcess) -> ChildMessage | None:
        """Relay messages and heartbeat until the child exits; stop it if the job stops being ours."""
        outcome: ChildMessage | None = None
        next_beat = 0.0
        stop_deadline: float | None = None
        while not child.finished:
            try:
                for message in child.messages(timeout=0.5):
                    self.heard = True
                    if isinstance(message, CompletedMessage | StoppedMessage):
                        outcome = message
                    elif not self._db(lambda m=message: self._record(m)):
                        stop_deadline = stop_deadline or self._stop(child)
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.settings.heartbeat_seconds
                    if stop_deadline is None:
                        if self._db(lambda: self._fenced_update({})):
                            self._renew_grant()
                        else:
                            stop_deadline = self._stop(child)
            except LeaseLost:
                child.kill()  # self-fencing: a trainer without a lease must not keep the GPU or write
                raise
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                child.kill()
        return outcome

    def hand_over(self, owner: str, event: str) -> bool:
        """Name the job's new lease owner (an executor that trains it elsewhere) and say so in an event;
        False when the job no longer runs on this attempt."""
        with session_scope(self.runner.session_factory) as session:
            if not self._fenced_update({"lease_owner": owner}, session):
                return False
            JobRepository(session).add_event(self.job_id, event)
            return True

    def _db(self, action: Callable[[], T]) -> T:
        """Run a database write (and what it stores: a checkpoint's upload, say), riding out an outage of
        the database or the artifact store for as long as this attempt's lease lasts."""
        while True:
            try:
                result = action()
            except (OperationalError, StoreUnavailable) as error:
                if time.monotonic() > self.lease_deadline:
                    raise LeaseLost from error
                what = "database" if isinstance(error, OperationalError) else "artifact store"
                log.warning("job %s: %s unavailable (%s); retrying", self.job_id, what, error)
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
            elif isinstance(message, LearningRateMessage):
                self._save_learning_rate(session, message)
            elif isinstance(message, LogMessage):
                if message.level == "error":
                    self.last_error = message
                else:
                    repo.add_event(self.job_id, message.message, level=message.level)
        for key in expired:  # only once the rows that named them are gone for good
            self._db(partial(self.store.delete, key))
        return True

    def _record_pause(self, message: StoppedMessage) -> None:
        """Say where a paused attempt stopped, once its checkpoint is recorded: a client polling events learns
        that its pause took effect and the step a resume continues from. A cancelled or already resumed job
        is no longer this attempt's to write to: nothing."""
        with session_scope(self.runner.session_factory) as session:
            if self._fenced_update({}, session, paused_too=True):
                JobRepository(session).add_event(
                    self.job_id,
                    f"Paused at step {message.step}: a resume continues from its checkpoint",
                    data={"step": message.step},
                )

    def _save_learning_rate(self, session: Session, message: LearningRateMessage) -> None:
        """Store the rate the range test resolved, so the job echoes it and a later attempt (a resume, a
        retry) trains with it rather than testing again, and say how it was found."""
        repo = JobRepository(session)
        job = repo.get(self.job_id)
        assert job is not None and job.hyperparameters is not None
        job.hyperparameters = job.hyperparameters.with_learning_rate(
            message.learning_rate, message.learning_rate_multiplier
        )
        repo.add_event(self.job_id, _learning_rate_text(message), data=message.model_dump(exclude={"type"}))

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
        self._describe(session, job, message.step, message.metrics, Path(message.path))
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

    def _describe(self, session: Session, job: Job, step: int, metrics: Metrics, directory: Path) -> None:
        """Write an artifact's lineage, and name its base as registered rather than where it was read."""
        write_lineage(session, job, self.data.objective, step, metrics, directory, self.parent)
        for path in directory.rglob("*"):
            if path.is_file() and (renamed := renamed_metadata(path, self.base_renames)) is not None:
                path.write_bytes(renamed)

    def _publish(self, done: CompletedMessage) -> None:
        """Store the adapter and results, then succeed in one CAS; a lost race discards them."""
        adapter_key = f"{self.prefix}/adapter"
        merged_key = f"{self.prefix}/merged" if done.merged_path else None
        step = done.published_step or done.step
        published = {adapter_key: done.adapter_path}
        if merged_key and done.merged_path:
            published[merged_key] = done.merged_path
        with session_scope(self.runner.session_factory) as session:
            job = JobRepository(session).get(self.job_id)
            assert job is not None
            for path in published.values():
                self._describe(session, job, step, done.metrics, Path(path))
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
                    "published_step": step,
                    "finished_at": int(time.time()),
                    "estimated_finish": None,
                },
            )
            if succeeded:
                log.info("job %s succeeded: %s", self.job_id, name)
                repo = JobRepository(session)
                if job.publish == "best":
                    repo.add_event(self.job_id, _published_text(job, step, done), data={"step": step})
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


def _published_text(job: Job, step: int, done: CompletedMessage) -> str:
    assert job.hyperparameters is not None
    metric = job.hyperparameters.metric_for_best_checkpoint
    value = done.metrics.get(metric)
    by = f"{metric}={value:.4f}" if value is not None else metric
    if step == done.step:
        return f"Publishing the last step, {step}: it is the best checkpoint ({by})"
    return f"Publishing the best checkpoint, step {step} of {done.step} ({by}), not the last step"


def _metrics_summary(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name.removeprefix('full_valid_')}={value:.4f}" for name, value in metrics.items())


def _learning_rate_text(message: LearningRateMessage) -> str:
    cost = (
        f"{message.steps} test steps, {message.examples} examples ({message.cost:.1%} of the job's training)"
    )
    if message.found:
        return (
            f"Learning rate found by a range test: multiplier {message.learning_rate_multiplier:g} "
            f"(learning rate {message.learning_rate:.3g}), {message.reason}; cost {cost}"
        )
    return (
        f"Learning rate multiplier kept at {message.learning_rate_multiplier:g} (learning rate "
        f"{message.learning_rate:.3g}): {message.reason}; cost {cost}"
    )


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
