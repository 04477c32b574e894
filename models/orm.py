"""Tables. Times are unix seconds (what the API shows); `seq` gives stable newest-first order."""

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from models.db import Base, JSONType, ModelJSON
from models.spec import ResolvedHyperparameters

# SQLite only auto-increments an INTEGER PRIMARY KEY; Postgres gets a BIGINT identity.
SeqType = BigInteger().with_variant(Integer(), "sqlite")

QUEUED = "status = 'queued'"
"""A partial index's predicate (the claim's queries say it literally, so a prepared plan can use it)."""


class RegisteredModel(Base):
    """A base model that jobs may fine-tune: a registered name and a local Hugging Face directory."""

    __tablename__ = "registered_model"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[int] = mapped_column(BigInteger)
    architecture: Mapped[str | None] = mapped_column(String(128))
    """From its config.json (`LlamaForCausalLM`, `BertModel`): says which objectives it can train."""
    content_hash: Mapped[str | None] = mapped_column(String(80))
    """`models.registry.content_hash` at registration: what a job's lineage records."""


class Organization(Base):
    """A tenant: every file, job and model belongs to one, and only its keys see them."""

    __tablename__ = "organization"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    """The organisation segment of its fine-tuned model names (`ft:{base}:{name}:{suffix}:{id}`)."""
    created_at: Mapped[int] = mapped_column(BigInteger)
    storage_quota_bytes: Mapped[int | None] = mapped_column(BigInteger)
    """Most bytes its files and artifacts may hold (0: no limit); None: the server's default."""
    share_weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    """Fair-share weight: the scheduler orders organisations by their device use divided by it."""
    device_caps: Mapped[dict[str, int] | None] = mapped_column(JSONType)
    """Most devices its running jobs may hold per device class (`"*"`: every class); None: no cap."""
    monthly_device_hours: Mapped[float | None] = mapped_column(Float)
    """Device-hours its jobs may use per calendar month (UTC); None: no budget."""


class ApiKey(Base):
    """An API key, stored as a hash: the secret itself is shown once, when the key is created."""

    __tablename__ = "api_key"
    __table_args__ = (Index("ix_api_key_organization_id", "organization_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    """Public, and part of the key (`sk-ftj-{id}-{secret}`): how a presented key finds its row."""
    organization_id: Mapped[str | None] = mapped_column(ForeignKey("organization.id"))
    """None for an admin key."""
    name: Mapped[str] = mapped_column(String(128))
    key_hash: Mapped[str] = mapped_column(String(64))
    """sha256 of the whole key, hex."""
    redacted: Mapped[str] = mapped_column(String(32))
    """What listings show: the key's first and last characters."""
    created_at: Mapped[int] = mapped_column(BigInteger)
    last_used_at: Mapped[int | None] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)


class File(Base):
    __tablename__ = "file"
    __table_args__ = (Index("ix_file_org_seq", "organization_id", "seq"),)

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    storage_key: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int | None] = mapped_column(BigInteger)


class Job(Base):
    __tablename__ = "fine_tuning_job"
    __table_args__ = (
        Index("ix_fine_tuning_job_org_seq", "organization_id", "seq"),
        Index("ix_fine_tuning_job_status", "status"),
        Index("ix_fine_tuning_job_fine_tuned_model", "fine_tuned_model"),
        # The claim's fair-share window: the jobs started lately.
        Index("ix_fine_tuning_job_started_at", "started_at"),
    )

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))
    method: Mapped[dict[str, Any]] = mapped_column(JSONType)
    """The method as requested (hyperparameters may say "auto")."""
    hyperparameters: Mapped[ResolvedHyperparameters | None] = mapped_column(
        ModelJSON(ResolvedHyperparameters)
    )
    """Resolved hyperparameters, set when the job starts."""
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSONType)
    integrations: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300))
    """`ft:{base ≤128}:{org ≤64}:{suffix ≤64}:{8}`: up to 270 characters."""
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    result_files: Mapped[list[str]] = mapped_column(JSONType)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[int | None] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    adapter_key: Mapped[str | None] = mapped_column(String(256))
    """The published artifact; None again once its model is deleted (the name stays, as OpenAI keeps it)."""
    export_merged: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Extension: also publish the adapter merged into its base, verified (see docs/models.md)."""
    merged_key: Mapped[str | None] = mapped_column(String(256))
    artifact_bytes: Mapped[int | None] = mapped_column(BigInteger)
    """Size of the published adapter and merged export: what they count against the storage quota."""
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    """Baseline vs tuned metrics and the best checkpoint (see docs/evaluation.md), kept up to date."""
    compute: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    """The request's `compute` (devices, nodes, device class); None for one device."""
    publish: Mapped[str | None] = mapped_column(String(8))
    """Extension: `best` (the best evaluated checkpoint's weights) or `last`; None: a job from before it."""
    published_step: Mapped[int | None] = mapped_column(Integer)
    """The step whose weights `fine_tuned_model` holds."""
    devices: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """`compute.devices` as a column, for the claim."""
    device_class: Mapped[str | None] = mapped_column(String(64))
    """`compute.device_class` as a column, for the claim; None: any class."""
    priority: Mapped[int] = mapped_column(Integer, default=5, server_default="5")
    """Extension: 0-9, higher first."""
    preemptible: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Extension: a higher-priority job that cannot start may pause it (it resumes by itself)."""
    device_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    """Devices times seconds its attempts have held them (the job's `usage`)."""
    worker_id: Mapped[str | None] = mapped_column(String(128))
    """The worker that claimed its latest attempt."""
    wait_reason: Mapped[str | None] = mapped_column(String(256))
    """Why a queued job waits (no worker offers what it needs), said once in an event."""
    preempted_by: Mapped[str | None] = mapped_column(String(64))
    """The job a preemption paused this one for: it resumes by itself once that one has started."""
    # Reliability: each run is an attempt; a worker holds the job through a renewed lease.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    dispatched_at: Mapped[float | None] = mapped_column(Float)
    """When a runner was last woken for this job; the reconciler wakes one again if nothing happened."""


# The claim (models/scheduling.py): which organisations have queued jobs, and each one's next, highest
# priority then oldest, straight from the index; only queued jobs, so it stays small.
Index(
    "ix_fine_tuning_job_queued",
    Job.organization_id,
    Job.priority.desc(),
    Job.seq,
    postgresql_where=text(QUEUED),
    sqlite_where=text(QUEUED),
)


class Worker(Base):
    """A training worker's capacity, recorded when it starts and renewed by its heartbeat. Rows stay after a
    worker stops: the device classes ever registered are the ones a job may ask for."""

    __tablename__ = "worker"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    device_class: Mapped[str] = mapped_column(String(64))
    devices: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)


class JobEvent(Base):
    __tablename__ = "fine_tuning_job_event"
    __table_args__ = (Index("ix_fine_tuning_job_event_job_seq", "job_id", "seq"),)

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_job.id", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class JobCheckpoint(Base):
    __tablename__ = "fine_tuning_job_checkpoint"
    __table_args__ = (
        Index("ix_fine_tuning_job_checkpoint_job_seq", "job_id", "seq"),
        Index("ix_fine_tuning_job_checkpoint_model", "fine_tuned_model_checkpoint"),
    )

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_job.id", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(BigInteger)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, float]] = mapped_column(JSONType)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(300))
    storage_key: Mapped[str] = mapped_column(String(256))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    """Its size in the artifact store, counted against the storage quota."""


class IdempotencyKey(Base):
    """The first response to a POST that carried an `Idempotency-Key`, replayed to its retries for 24 h."""

    __tablename__ = "idempotency_key"
    __table_args__ = (UniqueConstraint("organization_id", "key"),)

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    """sha256 of the route and the request body: the same key with another request is refused."""
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)


class WebhookEndpoint(Base):
    """A URL an organisation registered for job events (OpenAI's `webhook_endpoint`)."""

    __tablename__ = "webhook_endpoint"
    __table_args__ = (Index("ix_webhook_endpoint_org_seq", "organization_id", "seq"),)

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2048))
    name: Mapped[str] = mapped_column(String(256))
    event_types: Mapped[list[str]] = mapped_column(JSONType)
    secret: Mapped[str] = mapped_column(String(64))
    """`whsec_…`, kept as is: signing needs the secret itself, so unlike API keys it can't be hashed."""
    previous_secret: Mapped[str | None] = mapped_column(String(64))
    """Still signs beside `secret` until `previous_secret_expires_at` (a rotation that keeps the old one)."""
    previous_secret_expires_at: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class WebhookDelivery(Base):
    """The outbox: one event for one endpoint, written in the transaction that ended the job, then sent
    (and retried) by `worker.webhooks`. No foreign keys, so no webhook row can ever fail a job's status
    change; deleting an endpoint deletes its deliveries."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (
        Index("ix_webhook_delivery_endpoint_seq", "endpoint_id", "seq"),
        Index("ix_webhook_delivery_due", "status", "next_attempt_at"),
    )

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    """Sent as `webhook-id`: the same for every attempt, so receivers can drop repeats."""
    endpoint_id: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger)
    """Also the event's `created_at`: when the job ended."""
    status: Mapped[str] = mapped_column(String(16))
    """pending, delivered or failed."""
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[float | None] = mapped_column(Float)
    """When a sender may (re)try it; a claim moves it past the send, as a lease. None once finished."""
    last_attempt_at: Mapped[float | None] = mapped_column(Float)
    """When the last attempt's outcome was known; the next is due a backoff delay later."""
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(512))
    """Why the last attempt failed short of a response (refused address, timeout, connection error)."""
    last_response: Mapped[str | None] = mapped_column(String(512))
    """The first characters of the last response's body, no more."""


class Sweep(Base):
    """A hyperparameter search (extension): trials are ordinary jobs that `models.sweeps` creates, watches
    and stops early from the database on each tick."""

    __tablename__ = "fine_tuning_sweep"
    __table_args__ = (Index("ix_fine_tuning_sweep_org_seq", "organization_id", "seq"),)

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    """running, succeeded, cancelled or failed."""
    base: Mapped[dict[str, Any]] = mapped_column(JSONType)
    """The job create body every trial starts from; a trial overrides its hyperparameters."""
    search_space: Mapped[dict[str, Any]] = mapped_column(JSONType)
    metric: Mapped[str | None] = mapped_column(String(64))
    """None until the first trial resolves its metric_for_best_checkpoint (the objective's default)."""
    max_trials: Mapped[int] = mapped_column(Integer)
    parallelism: Mapped[int] = mapped_column(Integer)
    early_stopping: Mapped[bool] = mapped_column(Boolean)
    """Cancel trials whose evaluation curve falls behind (successive halving)."""
    seed: Mapped[int] = mapped_column(BigInteger)
    """Seeds the sampler, so a sweep rebuilt from the database asks the same questions."""
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)


class SweepTrial(Base):
    """One trial of a sweep: the job it runs and the parameters the sampler chose for it."""

    __tablename__ = "fine_tuning_sweep_trial"
    # A trial number is taken once, so two drivers ticking at once cannot both add trial n.
    __table_args__ = (UniqueConstraint("sweep_id", "number"),)

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    sweep_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_sweep.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(String(64), unique=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    pruned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """The sweep cancelled it early: its evaluation curve fell behind the others'."""
