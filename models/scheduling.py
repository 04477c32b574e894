"""The scheduler of record: workers' capacity, which queued job a free worker claims next, and what each
organisation has used (docs/scheduling.md).

A worker *pulls*: in one serialised transaction it picks the next queued job that fits its free devices and
its device class, by priority, then its organisation's devices in use over its fair-share weight (then its
recent device-seconds over the weight), then age, within the organisation's per-class device cap, and
claims it with the one compare-and-set (`models.states.transition`). Celery messages only wake workers.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    Integer,
    ScalarSelect,
    Select,
    String,
    bindparam,
    case,
    func,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import InstrumentedAttribute, Session

from models.errors import APIError
from models.jobs import WAITING, JobRepository, accrued
from models.orm import Job, Organization, Worker
from models.states import JobStatus, transition

CLAIM_LOCK = 7_102_933
"""Postgres advisory lock id: one claim at a time, so caps and fair share see every earlier claim."""

ANY_CLASS = "*"
"""In an organisation's `device_caps`: the cap for every class it does not name."""


@dataclass(frozen=True)
class Capacity:
    """What one worker offers: `devices` of one `device_class`; it trains jobs on them one at a time or
    side by side, as long as their devices add up."""

    devices: int
    device_class: str


@dataclass(frozen=True)
class Claim:
    """A job a worker has claimed: what it needs to run it, without reading the job again under the lock."""

    id: str
    organization_id: str
    attempt: int
    """The claimed attempt's number."""


class Workers:
    """The workers' registry: capacity recorded at start and kept alive by heartbeats."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def register(self, worker_id: str, capacity: Capacity, *, now: float) -> None:
        """Record (or refresh) a worker's capacity; it is live until `live_seconds` after `now`."""
        # An upsert: a process's runner threads share its id and may register at the same moment.
        upsert = pg_insert if self.session.get_bind().dialect.name == "postgresql" else sqlite_insert
        fields = {"devices": capacity.devices, "device_class": capacity.device_class, "heartbeat_at": now}
        stmt = upsert(Worker).values(id=worker_id, started_at=now, **fields)
        self.session.execute(stmt.on_conflict_do_update(index_elements=[Worker.id], set_=fields))

    def heartbeat(self, worker_id: str, *, now: float) -> bool:
        stmt = update(Worker).where(Worker.id == worker_id).values(heartbeat_at=now)
        return self.session.execute(stmt).rowcount == 1  # pyright: ignore[reportAttributeAccessIssue]  # DML gives a CursorResult

    def live(self, *, now: float, live_seconds: float) -> Sequence[Worker]:
        return self.session.scalars(select(Worker).where(Worker.heartbeat_at >= now - live_seconds)).all()

    def known_classes(self) -> set[str]:
        """Every device class a worker has ever registered: the ones a job may ask for."""
        return set(self.session.scalars(select(Worker.device_class).distinct()))


def wait_reason(
    session: Session, devices: int, device_class: str | None, *, now: float, live_seconds: float
) -> str | None:
    """Why a job on `devices` devices of `device_class` (None: any) cannot run on any live worker, or None
    when one could (idle or not) or none is live (nothing to judge by: workers may be starting). The
    pre-flight says `fits: false` with it."""
    live = Workers(session).live(now=now, live_seconds=live_seconds)
    if not live or any(_fits(worker, devices, device_class) for worker in live):
        return None
    return wait_reason_text(live, devices, device_class)


def _fits(worker: Worker, devices: int, device_class: str | None) -> bool:
    return worker.devices >= devices and device_class in (None, worker.device_class)


def _status_is(status: JobStatus) -> ColumnElement[bool]:
    # A literal, not a parameter: a prepared statement's generic plan can then use the partial index.
    return Job.status == literal_column(f"'{status.value}'")


def _pick() -> Select[str, str, int]:
    """The claim's choice in one statement: the id, organisation and attempt of the job to claim (no row:
    none). Each organisation with queued jobs offers its highest-priority, oldest queued job that fits the
    worker's free devices, its class, the organisation's cap on that class, and is not in `skip`; the first
    of those by priority, then devices in use with it over the weight, then recent device-seconds over the
    weight, then age, is the one. Parameters: worker_id, devices, device_class (again as cap_key), since
    (the fair-share window's first second), skip."""
    queued, running = _status_is(JobStatus.QUEUED), _status_is(JobStatus.RUNNING)
    device_class = bindparam("device_class", type_=String)
    # Organisations with queued jobs, one index probe each (a loose index scan) rather than a DISTINCT
    # over every queued job; ORDER BY and LIMIT, not min(), which Postgres without statistics yet (a bulk of
    # new jobs) computes by reading every queued job.
    first = select(Job.organization_id).where(queued).order_by(Job.organization_id).limit(1)
    waiting = select(first.scalar_subquery().label("organization_id")).cte("waiting", recursive=True)
    after = first.where(Job.organization_id > waiting.c.organization_id).scalar_subquery()
    waiting = waiting.union_all(select(after).where(waiting.c.organization_id.is_not(None)))
    held = (
        select(
            Job.organization_id,
            func.sum(Job.devices).label("running"),
            func.sum(case((Worker.device_class == device_class, Job.devices), else_=0)).label("in_class"),
        )
        .join(Worker, Worker.id == Job.worker_id)
        .where(running)
        .group_by(Job.organization_id)
        .subquery("held")
    )
    recent = (
        select(Job.organization_id, func.sum(Job.device_seconds).label("seconds"))
        .where(Job.started_at >= bindparam("since"))
        .group_by(Job.organization_id)
        .subquery("recent")
    )
    caps = Organization.device_caps
    tenant = (
        select(
            waiting.c.organization_id,
            func.coalesce(Organization.share_weight, 1.0).label("weight"),
            func.coalesce(held.c.running, 0).label("running"),
            func.coalesce(held.c.in_class, 0).label("in_class"),
            func.coalesce(recent.c.seconds, 0.0).label("recent"),
            # Its own class's entry, else "*"'s; NULL: no cap. The key is a parameter of its own: SQLite's
            # is a JSON path.
            func.coalesce(
                caps[bindparam("cap_key", type_=JSON.JSONIndexType())].as_integer(),
                caps[ANY_CLASS].as_integer(),
            ).label("cap"),
        )
        .select_from(waiting)
        .outerjoin(Organization, Organization.id == waiting.c.organization_id)
        .outerjoin(held, held.c.organization_id == waiting.c.organization_id)
        .outerjoin(recent, recent.c.organization_id == waiting.c.organization_id)
        .where(waiting.c.organization_id.is_not(None))
        .subquery("tenant")
    )
    mine = select(func.coalesce(func.sum(Job.devices), 0)).where(
        running, Job.worker_id == bindparam("worker_id")
    )
    free = bindparam("devices", type_=Integer) - mine.scalar_subquery()
    head = (
        select(Job.seq)
        .where(
            queued,
            Job.organization_id == tenant.c.organization_id,
            Job.devices <= free,
            tenant.c.cap.is_(None) | (Job.devices <= tenant.c.cap - tenant.c.in_class),
            Job.device_class.is_(None) | (Job.device_class == device_class),
            Job.id.not_in(bindparam("skip", expanding=True)),
        )
        .order_by(Job.priority.desc(), Job.seq)
        .limit(1)
        .scalar_subquery()
    )
    # Materialised: as a subquery, each use of its `seq` below would search for the head again.
    heads = select(tenant, head.label("seq")).cte("heads").prefix_with("MATERIALIZED")

    def of_head(column: InstrumentedAttribute[int]) -> ScalarSelect[int]:
        # A primary-key lookup per head: a join made Postgres hash every job (it expects 100 heads, not 10).
        return select(column).where(Job.seq == heads.c.seq).scalar_subquery()

    best = (
        select(heads.c.seq)
        .where(heads.c.seq.is_not(None))
        # Priority first; then the share the organisation would hold with this job, over its weight (Kueue's
        # and the design note's dominant term); then what it used lately, over its weight (so a tenant that
        # just had a turn yields to one that had none); then age.
        .order_by(
            of_head(Job.priority).desc(),
            (heads.c.running + of_head(Job.devices)) / heads.c.weight,
            heads.c.recent / heads.c.weight,
            heads.c.seq,
        )
        .limit(1)
    )
    return select(Job.id, Job.organization_id, Job.attempt).where(Job.seq == best.scalar_subquery())


PICK = _pick()
"""Built once: building it is most of a claim's Python time."""


class Scheduler:
    def __init__(self, session: Session, *, window_seconds: float) -> None:
        self.session = session
        self.window_seconds = window_seconds

    def claim_next(
        self,
        worker_id: str,
        capacity: Capacity,
        *,
        now: float,
        values: dict[str, Any] | None = None,
        skip: Iterable[str] = (),
    ) -> Claim | None:
        """Claim for this worker the next queued job that fits it (queued → running as the job's next
        attempt, with `values` and a fresh lease written in the same compare-and-set), other than those in
        `skip`; None if none fits. The caller commits."""
        # First, outside the lock (its own row); on SQLite, whose one writer at a time needs no lock, this
        # write takes the database's before anything is read.
        Workers(self.session).register(worker_id, capacity, now=now)
        if self.session.get_bind().dialect.name == "postgresql":
            self.session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": CLAIM_LOCK})
        params = {
            "worker_id": worker_id,
            "devices": capacity.devices,
            "device_class": capacity.device_class,
            "cap_key": capacity.device_class,
            "since": math.ceil(now - self.window_seconds),  # started_at is whole seconds
            "skip": list(skip),
        }
        picked = self.session.execute(PICK, params).first()
        if picked is None:
            return None
        job_id, organization_id, attempt = picked
        claimed = transition(
            self.session,
            job_id,
            from_=JobStatus.QUEUED,
            to=JobStatus.RUNNING,
            attempt=attempt,
            values={**(values or {}), "attempt": attempt + 1, "worker_id": worker_id, "wait_reason": None}
            | {"started_at": int(now), "heartbeat_at": now},
        )
        # Under the lock no other claim can have moved it; a cancel or pause may have: not this one, then.
        return Claim(job_id, organization_id, attempt + 1) if claimed else None


def month_start(now: float) -> float:
    """The start of `now`'s calendar month, UTC: when monthly budgets start over."""
    day = datetime.fromtimestamp(now, UTC)
    return day.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


class Usage:
    """Device-seconds used. A job's count grows with each heartbeat of its attempts (devices times time
    held); an organisation's month is the sum over the jobs it created that month."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def month_seconds(self, organization_ids: Iterable[str] | None, *, now: float) -> dict[str, float]:
        stmt = select(Job.organization_id, func.sum(Job.device_seconds)).where(
            Job.created_at >= int(month_start(now))
        )
        if organization_ids is not None:
            stmt = stmt.where(Job.organization_id.in_(list(organization_ids)))
        rows = self.session.execute(stmt.group_by(Job.organization_id)).tuples()
        return {organization_id: float(seconds or 0.0) for organization_id, seconds in rows}

    def total_seconds(self) -> dict[str, float]:
        """Every organisation's device-seconds over all time (the /metrics counter)."""
        stmt = select(Job.organization_id, func.sum(Job.device_seconds)).group_by(Job.organization_id)
        return {org: float(seconds or 0.0) for org, seconds in self.session.execute(stmt).tuples()}

    def settle(self, job_id: str, attempt: int, *, now: float) -> None:
        """Count the time since the attempt's last heartbeat (its end): fenced by the attempt alone, since
        the job may have just succeeded, failed or paused."""
        self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt, Job.heartbeat_at.is_not(None))
            .values(accrued(now))
        )


def check_budget(session: Session, organization_id: str, *, now: float) -> None:
    """A 429 `quota_exceeded` when the organisation has used its monthly device-hour budget."""
    organization = session.get(Organization, organization_id)
    if organization is None or organization.monthly_device_hours is None:
        return
    used = Usage(session).month_seconds([organization_id], now=now).get(organization_id, 0.0) / 3600
    if used >= organization.monthly_device_hours:
        next_month = month_start(month_start(now) + 32 * 86400)
        raise APIError(
            f"Your organization has used {used:.2f} of its monthly_device_hours budget of "
            f"{organization.monthly_device_hours:g} device-hours this month; new jobs can be created when "
            "the budget starts over next month (UTC) or the administrator raises it.",
            status_code=429,
            param="monthly_device_hours",
            code="quota_exceeded",
            headers={"Retry-After": str(max(1, int(next_month - now)))},
        )


class Preemption:
    """What the reconciler's sweep does for the queue: say once why a job waits, pause preemptible jobs for
    higher-priority ones that cannot start, and resume those once the job they made room for has started."""

    def __init__(self, session: Session, *, now: float, live_seconds: float) -> None:
        self.session, self.now = session, now
        self.workers = {w.id: w for w in Workers(session).live(now=now, live_seconds=live_seconds)}

    def note_waits(self) -> list[str]:
        """Give each queued job no live worker could run one event saying what it waits for (and forget
        the reason once one could); the ids of the jobs that got one. Nothing while no worker is live."""
        if not self.workers:
            return []
        noted: list[str] = []
        shapes = select(Job.devices, Job.device_class).where(Job.status == JobStatus.QUEUED.value).distinct()
        for devices, device_class in self.session.execute(shapes).tuples().all():
            fits = any(_fits(worker, devices, device_class) for worker in self.workers.values())
            reason = None if fits else wait_reason_text(self.workers.values(), devices, device_class)
            same = [
                Job.status == JobStatus.QUEUED.value,
                Job.devices == devices,
                Job.device_class.is_(None) if device_class is None else Job.device_class == device_class,
            ]
            if reason is None:
                self.session.execute(
                    update(Job).where(*same, Job.wait_reason.is_not(None)).values(wait_reason=None)
                )
                continue
            changed = (Job.wait_reason.is_(None)) | (Job.wait_reason != reason)
            stmt = update(Job).where(*same, changed).values(wait_reason=reason).returning(Job.id)
            for job_id in self.session.scalars(stmt).all():
                JobRepository(self.session).add_event(job_id, f"Waiting for {reason}.", level="warn")
                noted.append(job_id)
        return noted

    def preempt(self) -> list[tuple[str, str]]:
        """Pause a running preemptible job of lower priority on a live worker that then fits a queued job
        no worker has room for; the (paused, waiting) pairs."""
        victims = self.session.scalars(
            select(Job)
            .where(
                Job.status == JobStatus.RUNNING.value, Job.preemptible, Job.worker_id.in_(list(self.workers))
            )
            .order_by(Job.priority, Job.started_at.desc())
        ).all()
        if not victims:
            return []
        held: dict[str, int] = {}
        running = select(Job.worker_id, func.sum(Job.devices)).where(Job.status == JobStatus.RUNNING.value)
        for worker_id, devices in self.session.execute(running.group_by(Job.worker_id)).tuples():
            held[str(worker_id)] = int(devices)
        # Jobs still validating their files count: the busy workers are what keeps them from validating.
        waiting = self.session.scalars(
            select(Job)
            .where(Job.status.in_(WAITING), Job.priority > min(v.priority for v in victims))
            .order_by(Job.priority.desc(), Job.seq)
            .limit(20)
        ).all()
        pairs: list[tuple[str, str]] = []
        paused: set[str] = set()
        for job in waiting:
            fitting = [w for w in self.workers.values() if _fits(w, job.devices, job.device_class)]
            if any(w.devices - held.get(w.id, 0) >= job.devices for w in fitting):
                continue  # a worker has room: it starts without anyone's help
            for victim in victims:
                worker = self.workers[victim.worker_id or ""]
                if (
                    victim.id in paused
                    or victim.priority >= job.priority
                    or worker not in fitting
                    or worker.devices - held.get(worker.id, 0) + victim.devices < job.devices
                ):
                    continue
                if self._pause(victim, job):
                    held[worker.id] = held.get(worker.id, 0) - victim.devices
                    paused.add(victim.id)
                    pairs.append((victim.id, job.id))
                    break
        return pairs

    def _pause(self, victim: Job, job: Job) -> bool:
        paused = transition(
            self.session,
            victim.id,
            from_=JobStatus.RUNNING,
            to=JobStatus.PAUSED,
            attempt=victim.attempt,
            values={"preempted_by": job.id, "estimated_finish": None},
        )
        if paused:
            JobRepository(self.session).add_event(
                victim.id,
                f"Preempted: paused at a checkpoint for job {job.id} (priority {job.priority} over "
                f"{victim.priority}); it resumes by itself when capacity frees up.",
                level="warn",
            )
            JobRepository(self.session).add_event(
                job.id, f"Preempting job {victim.id} (priority {victim.priority}) to make room for this one."
            )
            job.dispatched_at = None  # the sweep wakes a worker for it right away
        return paused

    def resume_preempted(self) -> list[tuple[str, str | None]]:
        """Queue again the jobs paused for a job that has since started (or ended): they continue from
        their latest checkpoint once a worker has room; their (id, device class)."""
        stopped = select(Job.id).where(
            Job.status.in_([JobStatus.QUEUED.value, JobStatus.VALIDATING_FILES.value])
        )
        candidates = self.session.scalars(
            select(Job).where(
                Job.status == JobStatus.PAUSED.value,
                Job.preempted_by.is_not(None),
                Job.preempted_by.not_in(stopped),
            )
        ).all()
        resumed: list[tuple[str, str | None]] = []
        for job in candidates:
            if transition(
                self.session,
                job.id,
                from_=JobStatus.PAUSED,
                to=JobStatus.QUEUED,
                values={"preempted_by": None, "dispatched_at": None},
            ):
                JobRepository(self.session).add_event(
                    job.id,
                    f"Resumed after preemption: job {job.preempted_by} has started; this one continues from "
                    "its latest checkpoint when a worker has room.",
                )
                resumed.append((job.id, job.device_class))
        return resumed


def wait_reason_text(live: Iterable[Worker], devices: int, device_class: str | None) -> str:
    of_class = f" of class {device_class!r}" if device_class else ""
    offered = ", ".join(sorted({f"{w.devices} {w.device_class}" for w in live})) or "none"
    return f"a worker with {devices} device(s){of_class} (live workers offer: {offered})"
