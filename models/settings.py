"""Service settings, read from `FTJOBS_*` environment variables (one place for every knob)."""

import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_ADMIN_KEY_CHARS = 32


class Settings(BaseSettings):
    # Errors don't echo what was given: some settings are secrets.
    model_config = SettingsConfigDict(env_prefix="FTJOBS_", extra="ignore", hide_input_in_errors=True)

    data_dir: Path = Field(
        default=Path("data"), description="Root for the SQLite file, artifacts and base models."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite at DATA_DIR/ftjobs.db (embedded mode)."
    )
    broker_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Celery broker (distributed mode)."
    )
    artifacts_dir: Path | None = Field(
        default=None, description="Artifact store root; default DATA_DIR/artifacts."
    )
    models_dir: Path | None = Field(
        default=None, description="Where pulled base models go; default DATA_DIR/models."
    )
    work_dir: Path | None = Field(
        default=None, description="Scratch space for running jobs; default DATA_DIR/work."
    )
    storage_url: str | None = Field(
        default=None,
        description="Keep artifacts in S3-compatible object storage, `s3://BUCKET/PREFIX` (credentials from "
        "the standard AWS variables or files); unset: the local directory ARTIFACTS_DIR.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="Endpoint of an S3-compatible server (SeaweedFS, MinIO...); unset: AWS."
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Node-local cache of objects from object storage that need a local path (training "
        "files, checkpoints, adapters); default DATA_DIR/cache.",
    )
    cache_max_bytes: int = Field(
        default=50 * 1024**3, ge=0, description="Size bound of the cache; least recently used entries go."
    )
    store_sweep_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="How often the reconciler sweeps the artifact store for what crashes left behind.",
    )
    store_orphan_seconds: float = Field(
        default=24 * 3600.0,
        ge=0,
        description="Age past which a half-published or half-deleted prefix, an aborted multipart upload or "
        "a local `.partial` leftover counts as orphaned (far longer than any upload takes).",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Server logs on stderr: text lines, or one JSON object a line (for log collectors).",
    )
    log_level: str | None = Field(
        default=None,
        description="Server log level (debug, info, warning...); unset: info, warning for `ftjobs up`.",
    )
    api_docs: bool = Field(
        default=False,
        description="Serve Swagger UI at /docs and ReDoc at /redoc; their pages load scripts from "
        "cdn.jsdelivr.net, so they are off unless asked for.",
    )

    admin_key: SecretStr | None = Field(
        default=None,
        description="The admin key (manages organisations and keys): at least 32 random characters, refused "
        "at start otherwise; unset: one is generated and printed once at first start.",
    )

    @field_validator("admin_key")
    @classmethod
    def _strong_admin_key(cls, key: SecretStr | None) -> SecretStr | None:
        """Anyone who reaches the API may guess the admin key: it must be long and random."""
        if key is not None and not _strong(key.get_secret_value()):
            raise ValueError(
                f"the admin key must be at least {MIN_ADMIN_KEY_CHARS} random characters; make one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return key

    rate_limit_per_minute: int = Field(
        default=600, ge=0, description="Requests per API key per minute (0: no limit); 429 above."
    )
    auth_failures_per_minute: int = Field(
        default=60,
        ge=0,
        description="Failed authentications (401s) per client address per minute (0: no limit); above it, "
        "that address gets 429 without its key being checked.",
    )
    rate_limit_storage: str = Field(
        default="memory://",
        description="Where request counts live (`limits` storage URI): memory:// counts per API process; "
        "redis://host:6379/1 shares them between processes and machines.",
    )
    max_active_jobs: int = Field(
        default=16, ge=1, description="Unfinished jobs (paused included) per organisation; 429 above."
    )
    max_upload_bytes: int = Field(
        default=512 * 1024 * 1024, description="Largest accepted upload (413 above)."
    )
    max_json_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1,
        description="Largest JSON body of every other route, the inference server's too (413 above, before "
        "it is parsed). A chat request with a 128k-token context is well under 1 MB.",
    )
    storage_quota_bytes: int = Field(
        default=100 * 1024**3,
        ge=0,
        description="Bytes an organisation's files and job artifacts may hold, unless the admin set its own "
        "limit (0: no limit); uploads get a 413 above, jobs that would publish above it fail.",
    )
    max_file_examples: int = Field(
        default=1_000_000, ge=1, description="Most examples in a training or validation file."
    )
    max_file_tokens: int = Field(
        default=50_000_000,
        ge=1,
        description="Most tokens in a training file, counted with the base's tokenizer.",
    )
    embedded_workers: int = Field(default=1, ge=1, description="Concurrent jobs in embedded mode.")
    devices: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Devices one job may train on (`ftjobs worker|up --devices`); the API refuses a job "
        "asking for more. Unset: a worker uses the GPUs it sees (1 on CPU), and the API leaves the check "
        "to the worker (docs/distributed.md).",
    )
    device_class: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[a-z0-9][a-z0-9._-]*$",
        description="The class of a worker's devices (`ftjobs worker|up --device-class`): jobs asking for "
        "`compute.device_class` run only on workers of that class. Unset: the GPUs' name, or `cpu`.",
    )
    fair_share_window_seconds: float = Field(
        default=86400.0,
        gt=0,
        description="How far back an organisation's device-seconds count towards its fair share "
        "(docs/scheduling.md).",
    )
    worker_queue: str = Field(
        default="ftjobs",
        description="Celery queue prefix: jobs of any class wake `NAME`, jobs of class C wake `NAME.C`; a "
        "worker consumes both.",
    )
    executor: Literal["local", "slurm"] = Field(
        default="local",
        description="Where a claimed job trains: `local`, a child process of the worker (one node); `slurm`, "
        "an allocation of `compute.nodes` nodes that `sbatch` asks a Slurm cluster for, one `ftjobs "
        "run-attempt` per node (docs/distributed.md). Set it on the API too: it decides whether "
        "`compute.nodes` above 1 is accepted, and the reconciler then watches the allocations.",
    )
    slurm_partition: str | None = Field(
        default=None,
        description="Slurm partition of the allocations (`sbatch --partition`); unset: the default.",
    )
    slurm_account: str | None = Field(
        default=None, description="Slurm account the allocations are charged to (`sbatch --account`)."
    )
    slurm_gpus: bool = Field(
        default=False,
        description="Ask Slurm for `compute.devices` GPUs per node (`--gpus-per-node`); else the devices are "
        "CPU ranks (`--cpus-per-task`).",
    )
    slurm_extra_args: str = Field(
        default="",
        description="More `sbatch` options, shell-quoted (`--time=24:00:00 --qos=high --exclusive`).",
    )
    slurm_command: str = Field(
        default="ftjobs",
        description="How a Slurm node starts ftjobs (shell-quoted), e.g. `/opt/venv/bin/ftjobs`: each node "
        "runs `COMMAND run-attempt JOB ATTEMPT` with the submitting worker's environment.",
    )
    slurm_rendezvous_port: int = Field(
        default=29500,
        ge=1024,
        le=64535,
        description="The ranks' rendezvous on an allocation's first node listens on this port plus the Slurm "
        "job id modulo 1000 (so allocations sharing a node don't collide).",
    )
    heartbeat_seconds: float = Field(
        default=2.0, gt=0, description="How often a running job reports liveness."
    )
    lease_seconds: float = Field(default=60.0, gt=0, description="How long a heartbeat keeps a job's lease.")
    checkpoint_every_steps: int = Field(
        default=0, ge=0, description="Also checkpoint every N steps (0: at epoch ends only), for resuming."
    )
    checkpoint_retention: int = Field(default=3, ge=1, description="Checkpoints kept per job (newest).")
    max_attempts: int = Field(default=3, ge=1, description="Attempts before a job whose workers die fails.")
    reconcile_seconds: float = Field(default=10.0, gt=0, description="How often the reconciler sweeps.")
    redispatch_seconds: float = Field(
        default=60.0, gt=0, description="Wake runners again for jobs still waiting after this long."
    )
    cancel_grace_seconds: float = Field(
        default=30.0, ge=0, description="Grace before a cancelled trainer is killed."
    )

    webhook_allow_private_urls: bool | None = Field(
        default=None,
        description="Let webhooks reach loopback, private and link-local addresses (SSRF). Unset: refused, "
        "but allowed by `ftjobs up` on a loopback host, where only this machine reaches the API.",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="The most one webhook delivery attempt takes, from connecting to the end of the answer.",
    )
    webhook_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often each process's webhook sender looks for due deliveries."
    )
    webhook_retry_base_seconds: float = Field(
        default=5.0, gt=0, description="First retry delay of a failed delivery; doubled each time, to 1 h."
    )
    webhook_max_attempts: int = Field(default=100, ge=1, description="Attempts before a delivery fails.")
    webhook_max_age_seconds: float = Field(
        default=72 * 3600.0, gt=0, description="A delivery not made this long after its event fails (72 h)."
    )

    wandb_dir: Path | None = Field(
        default=None,
        description="Where jobs' W&B runs are kept (offline runs stay there for `wandb sync`), one "
        "subdirectory per organisation; default DATA_DIR/wandb. Mode, key and server: W&B's own WANDB_MODE, "
        "WANDB_API_KEY and WANDB_BASE_URL.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking server or store of jobs' mlflow integrations; default a SQLite store at "
        "DATA_DIR/mlflow.db.",
    )
    tensorboard_dir: Path | None = Field(
        default=None,
        description="Root of jobs' TensorBoard logs, one subdirectory per organisation and job; default "
        "DATA_DIR/tensorboard.",
    )

    inference_url: str = Field(
        default="http://127.0.0.1:8001",
        description="Where the API forwards inference requests, and reinforcement jobs' trainers ask model "
        "graders' judges (`ftjobs serve`; `ftjobs up` starts one).",
    )
    inference_token: SecretStr | None = Field(
        default=None,
        description="Shared secret the API shows the inference server (`ftjobs up` makes one); workers sign "
        "their trainers' judge grants with it. Unset, the inference server serves whoever reaches it: keep "
        "it on a private network.",
    )
    preflight_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Longest a pre-flight estimate may run (in a child process of the inference server, "
        "killed past it: 400 `preflight_too_costly`).",
    )
    inference_adapter_cache: int = Field(
        default=8, ge=1, description="Adapters an inference process keeps loaded (least recently used go)."
    )
    inference_max_queue: int = Field(
        default=256,
        ge=1,
        description="Requests an inference process lets wait for a place in a batch; the next get a 429 "
        "with Retry-After.",
    )

    inference_engine: Literal["ftjobs", "vllm"] = Field(
        default="ftjobs",
        description="What generates in `ftjobs serve`: `ftjobs` (continuous batching, any artifact) or "
        "`vllm` (vLLM's engine for base models and LoRA adapters, an optional install; other artifacts "
        "still run on ftjobs' engine in the same process). See docs/models.md.",
    )
    inference_vllm_args: dict[str, Any] = Field(
        default={},
        description='Extra vLLM engine arguments as JSON (e.g. \'{"gpu_memory_utilization": 0.8, '
        "\"max_lora_rank\": 128}'), over ftjobs' defaults; only with inference_engine=vllm.",
    )

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'ftjobs.db').resolve()}"

    @property
    def artifacts_root(self) -> Path:
        return self.artifacts_dir or self.data_dir / "artifacts"

    @property
    def models_root(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def work_root(self) -> Path:
        return self.work_dir or self.data_dir / "work"

    @property
    def cache_root(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"

    @property
    def wandb_root(self) -> Path:
        return self.wandb_dir or self.data_dir / "wandb"

    def resolved_mlflow_tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.data_dir / 'mlflow.db').resolve()}"

    @property
    def tensorboard_root(self) -> Path:
        return self.tensorboard_dir or self.data_dir / "tensorboard"


def _strong(key: str) -> bool:
    """Long, and with no repeats for zlib to shrink (a word written four times, a run of one character):
    a rough test, but random keys (hex, base64, digits) always pass it, and typed-in ones rarely."""
    return len(key) >= MIN_ADMIN_KEY_CHARS and len(zlib.compress(key.encode(), 9)) >= len(key.encode())


@lru_cache
def get_settings() -> Settings:
    return Settings()
