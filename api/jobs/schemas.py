"""Fine-tuning job shapes, field for field as OpenAI's, with our extensions as extra keys."""

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from graders.shapes import Grader
from models.hyperparameters import (
    DpoHyperparameters,
    ReinforcementHyperparameters,
    SupervisedHyperparameters,
    echoed,
)
from models.orm import Job

MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
MAX_INTEGRATIONS, MAX_TRACKER_NAME, MAX_TRACKER_TAGS, MAX_TRACKER_TAG = 5, 128, 20, 64
WANDB_FORBIDDEN = "/\\#?%:"
"""Characters W&B refuses in project and entity names."""
SUFFIX = re.compile(r"^[A-Za-z0-9._-]+$")
RESERVED_TAG_PREFIXES = ("mlflow.", "ftjobs.")
"""MLflow's system tags and ours (the job id): a user's tag must not pass for them."""


REQUEST = ConfigDict(extra="forbid", use_attribute_docstrings=True)
"""Request bodies: unknown keys are a 400, and each field's docstring is its description in /docs."""


class SupervisedMethod(BaseModel):
    model_config = REQUEST
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)
    """What the job trains with; unset keys resolve when it starts."""


class DpoMethod(BaseModel):
    model_config = REQUEST
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)
    """What the job trains with; unset keys resolve when it starts."""


class ReinforcementMethod(BaseModel):
    model_config = REQUEST
    grader: Grader
    """Scores each sampled answer: string_check, text_similarity, python or multi (docs/api.md#graders)."""
    hyperparameters: ReinforcementHyperparameters = Field(default_factory=ReinforcementHyperparameters)
    """What the job trains with; unset keys resolve when it starts."""
    response_format: dict[str, Any] | None = None
    """Accepted and echoed: answers are not constrained to it; `{{sample.output_json}}` is the answer
    parsed as JSON whenever it parses (docs/api.md)."""


class Method(BaseModel):
    """OpenAI's `method`; `reward_model` (reward modelling on preference pairs) is our extension."""

    model_config = REQUEST
    type: Literal["supervised", "dpo", "reinforcement", "reward_model"]
    """The method; its settings go in the key of the same name."""
    supervised: SupervisedMethod | None = None
    """Settings of a supervised job (chat, prompt/completion, raw text, classification, NER files)."""
    dpo: DpoMethod | None = None
    """Settings of a DPO job (preference files)."""
    reinforcement: ReinforcementMethod | None = None
    """Settings of a reinforcement job (prompt files; GRPO with the grader's rewards)."""
    reward_model: SupervisedMethod | None = None
    """Extension: settings of a reward-model job (preference files)."""

    @field_validator("supervised", "dpo", "reinforcement", "reward_model")
    @classmethod
    def _settings_of_its_type(cls, value: object, info: ValidationInfo) -> object:
        method_type = info.data.get("type")
        if value is not None and method_type is not None and info.field_name != method_type:
            raise ValueError(f"a {method_type} method takes no {info.field_name!r} object")
        return value


def _printable(value: str) -> str:
    # Names go into trackers' stores and UIs: no control characters (NUL, newlines, escapes).
    if not value.isprintable():
        raise ValueError("must not contain control characters")
    return value


def _wandb_name(value: str) -> str:
    if forbidden := sorted(set(value) & set(WANDB_FORBIDDEN)):
        raise ValueError(f"must not contain any of {' '.join(forbidden)}")
    return value


def _mlflow_tag_key(value: str) -> str:
    # MLflow may store a tag as a file: its key must not resolve to another path.
    if any(part in ("", ".", "..") for part in value.split("/")) or value.startswith(RESERVED_TAG_PREFIXES):
        reserved = " or ".join(RESERVED_TAG_PREFIXES)
        raise ValueError(f"a tag key must be a plain name, not starting with {reserved}")
    return value


TrackerName = Annotated[str, Field(min_length=1, max_length=MAX_TRACKER_NAME), AfterValidator(_printable)]
WandbName = Annotated[TrackerName, AfterValidator(_wandb_name)]
TrackerTag = Annotated[str, Field(min_length=1, max_length=MAX_TRACKER_TAG), AfterValidator(_printable)]
MlflowTagKey = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TRACKER_TAG, pattern=r"^[A-Za-z0-9_.\- :/]+$"),
    AfterValidator(_mlflow_tag_key),
]
MlflowTagValue = Annotated[str, Field(max_length=MAX_METADATA_VALUE), AfterValidator(_printable)]


class WandbIntegration(BaseModel):
    model_config = REQUEST
    project: WandbName
    """The W&B project the run goes to."""
    name: TrackerName | None = None
    """The run's display name (default: W&B's)."""
    entity: WandbName | None = None
    """The team or user owning the run (default: the key's)."""
    tags: Annotated[list[TrackerTag], Field(max_length=MAX_TRACKER_TAGS)] | None = None
    """Tags on the run."""


class MlflowIntegration(BaseModel):
    """Extension. The experiment is created if new, under the organisation's name (`{org}/{name}`, or `{org}`
    alone); where the tracking server is, is the operator's setting."""

    model_config = REQUEST
    experiment_name: TrackerName | None = None
    """The experiment under the organisation's name (default: the organisation's own)."""
    run_name: TrackerName | None = None
    """The run's name (default: MLflow's)."""
    tags: Annotated[dict[MlflowTagKey, MlflowTagValue], Field(max_length=MAX_TRACKER_TAGS)] | None = None
    """Tags on the run (keys must not start with `mlflow.` or `ftjobs.`)."""


class TensorboardIntegration(BaseModel):
    """Extension, with nothing to choose: the job's logs go to the operator's directory, one per job."""

    model_config = REQUEST


INTEGRATION_SETTINGS: dict[str, type[BaseModel]] = {
    "wandb": WandbIntegration,
    "mlflow": MlflowIntegration,
    "tensorboard": TensorboardIntegration,
}


class Integration(BaseModel):
    """OpenAI's `{type: "wandb", wandb: {...}}`; `mlflow` and `tensorboard` are extensions in its shape."""

    model_config = REQUEST
    type: Literal["wandb", "mlflow", "tensorboard"]
    """The tracker; its settings go in the key of the same name."""
    wandb: WandbIntegration | None = None
    """Settings of a W&B run (required for `wandb`)."""
    mlflow: MlflowIntegration | None = None
    """Extension: settings of an MLflow run."""
    tensorboard: TensorboardIntegration | None = None
    """Extension: TensorBoard takes no settings."""

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> "Integration":
        if other := next((k for k in INTEGRATION_SETTINGS if k != self.type and getattr(self, k)), None):
            raise ValueError(f"a {self.type} integration takes no {other!r} object")
        if self.type == "wandb" and self.wandb is None:
            raise ValueError("a wandb integration needs a 'wandb' object naming its project")
        return self

    def stored(self, job_id: str) -> dict[str, Any]:
        """As the job keeps and shows it; the W&B run is the job's id, as OpenAI's is."""
        fields = (getattr(self, self.type) or INTEGRATION_SETTINGS[self.type]()).model_dump()
        if self.type == "wandb":
            fields["run_id"] = job_id
        return {"type": self.type, self.type: fields}


class Compute(BaseModel):
    """Extension: what one job trains on (docs/distributed.md)."""

    model_config = REQUEST
    devices: Annotated[int, Field(strict=True, ge=1, le=64)] = 1
    """Devices (GPUs, or CPU ranks) per node; more than one trains data-parallel (adapter methods) or
    sharded (full, freeze)."""
    nodes: Annotated[int, Field(strict=True, ge=1, le=64)] = 1
    """Machines the job spans (only 1 for now)."""
    device_class: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    """A class of device to run on, as workers register it (`ftjobs worker --device-class`); None: any."""


class JobCreate(BaseModel):
    model_config = REQUEST

    model: Annotated[str, Field(min_length=1, max_length=256)]
    """The model to fine-tune: a registered base, or one of your fine-tuned models or checkpoints to tune
    further (`client.models.list()` shows them; docs/api.md)."""
    training_file: Annotated[str, Field(min_length=1, max_length=64)]
    """The id of an uploaded `fine-tune` file; its format says what the job learns (docs/api.md)."""
    validation_file: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    """The id of an uploaded `fine-tune` file in the same format: the base and every checkpoint are
    evaluated on it."""
    method: Method | None = None
    """How to train: `{"type": t, t: {"hyperparameters": {...}}}` (default: supervised with defaults)."""
    hyperparameters: SupervisedHyperparameters | None = None
    """Deprecated in favour of `method`; accepted as the supervised method's hyperparameters."""
    suffix: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    """Up to 64 characters added to the fine-tuned model's name (no `:` or whitespace)."""
    seed: Annotated[int, Field(strict=True, ge=0, le=2147483647)] | None = None
    """Makes the job reproducible (default: a random seed, shown on the job)."""
    integrations: Annotated[list[Integration], Field(max_length=MAX_INTEGRATIONS)] | None = None
    """Trackers that also log the job's hyperparameters and metrics (docs/integrations.md)."""
    metadata: dict[str, str] | None = None
    """Up to 16 key-value pairs to tag and filter jobs by (keys up to 64 characters, values up to 512)."""
    export_merged: Annotated[bool, Field(strict=True)] = False
    """Extension: also publish the adapter merged into its base as a whole model, verified against the
    adapter (lora, dora and qlora; docs/models.md)."""
    compute: Compute | None = None
    """Extension: how many devices the job trains on (default: one; docs/distributed.md)."""
    publish: Literal["best", "last"] | None = None
    """Extension: which weights `fine_tuned_model` names: the best evaluated checkpoint's by
    `metric_for_best_checkpoint` (`best`, the default with a validation file) or the last step's (`last`,
    OpenAI's meaning, the default without one; docs/evaluation.md)."""
    priority: Annotated[int, Field(strict=True, ge=0, le=9)] = 5
    """Extension: 0-9, higher first among its organisation's and others' queued jobs (docs/scheduling.md)."""
    preemptible: Annotated[bool, Field(strict=True)] = False
    """Extension: a job of higher priority that cannot start may pause it; it resumes by itself."""

    @field_validator("suffix")
    @classmethod
    def _suffix_chars(cls, value: str | None) -> str | None:
        # One `:`-separated segment of the fine_tuned_model name, which travels in URL paths (where `/`,
        # `%` and dot segments would change it) and in a download's file name.
        if value is not None and (not SUFFIX.match(value) or ".." in value):
            raise ValueError("the suffix may hold only A-Z, a-z, 0-9, '.', '_' and '-', and not '..'")
        return value

    @field_validator("integrations")
    @classmethod
    def _one_integration_per_type(cls, value: list[Integration] | None) -> list[Integration] | None:
        # A job has one run in each tracker.
        types = [integration.type for integration in value or []]
        if len(set(types)) < len(types):
            raise ValueError("at most one integration of each type")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            check_metadata(value)
        return value


def check_metadata(pairs: dict[str, str]) -> None:
    """A job's metadata limits (ValueError), which also bound the `metadata[key]=value` filters that search
    it: a filter no job's metadata could match is a mistake, and each one is a term of the query."""
    if len(pairs) > MAX_METADATA_PAIRS:
        raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
    for key, item in pairs.items():
        if not 1 <= len(key) <= MAX_METADATA_KEY:
            raise ValueError(f"keys must be 1 to {MAX_METADATA_KEY} characters")
        if len(item) > MAX_METADATA_VALUE:
            raise ValueError(f"values must be at most {MAX_METADATA_VALUE} characters")
        if "\0" in key + item:
            # Postgres cannot store it (SQLite can): refused on both, so metadata means the same on each.
            raise ValueError("keys and values must not contain NUL characters")


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    model: str
    status: str
    training_file: str
    validation_file: str | None
    fine_tuned_model: str | None
    finished_at: int | None
    trained_tokens: int | None
    result_files: list[str]
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    organization_id: str
    seed: int
    error: JobError | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]] | None
    metadata: dict[str, str] | None
    user_provided_suffix: str | None
    # Extensions.
    export_merged: bool
    compute: dict[str, Any]
    """What the job trains on: devices, nodes, device_class."""
    priority: int
    preemptible: bool
    usage: dict[str, float]
    """`{"device_seconds": N}`: devices times the seconds its attempts held them."""
    evaluation: dict[str, Any] | None
    """Baseline vs tuned metrics and the best checkpoint, once the job has a validation file and has
    started (docs/evaluation.md)."""
    publish: Literal["best", "last"]
    published_step: int | None
    """The step whose weights `fine_tuned_model` holds, once published."""

    @classmethod
    def of(cls, job: Job) -> "FineTuningJob":
        # Until the job starts, the requested values (possibly "auto") are shown; then the resolved ones.
        method_type = job.method["type"]
        requested = job.method[method_type]["hyperparameters"]
        resolved = job.hyperparameters
        hyperparameters = echoed(method_type, requested, resolved) if resolved else requested
        # A reinforcement method also carries its grader and response_format.
        method = {
            "type": method_type,
            method_type: {**job.method[method_type], "hyperparameters": hyperparameters},
        }
        return cls(
            id=job.id,
            created_at=job.created_at,
            model=job.model,
            status=job.status,
            training_file=job.training_file,
            validation_file=job.validation_file,
            fine_tuned_model=job.fine_tuned_model,
            finished_at=job.finished_at,
            trained_tokens=job.trained_tokens,
            result_files=job.result_files,
            hyperparameters={
                k: hyperparameters.get(k, "auto")
                for k in ("n_epochs", "batch_size", "learning_rate_multiplier")
            },
            method=method,
            organization_id=job.organization_id,
            seed=job.seed,
            error=JobError(**job.error) if job.error else None,
            estimated_finish=job.estimated_finish,
            integrations=job.integrations,
            metadata=job.metadata_,
            user_provided_suffix=job.suffix,
            export_merged=job.export_merged,
            compute=Compute.model_validate(job.compute or {}).model_dump(),
            priority=job.priority,
            preemptible=job.preemptible,
            usage={"device_seconds": round(job.device_seconds, 3)},
            evaluation=job.evaluation,
            publish="best" if job.publish == "best" else "last",
            published_step=job.published_step,
        )


class FineTuningJobEvent(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


class FineTuningJobCheckpoint(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str = Field(validation_alias="job_id")
    step_number: int
    metrics: dict[str, float]
