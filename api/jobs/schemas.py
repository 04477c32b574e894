"""Fine-tuning job shapes, field for field as OpenAI's, with our extensions as extra keys."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.hyperparameters import DpoHyperparameters, SupervisedHyperparameters
from models.orm import Job

MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(BaseModel):
    """OpenAI's `method`; `reward_model` (reward modelling on preference pairs) is our extension."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement", "reward_model"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict[str, Any] | None = None
    reward_model: SupervisedMethod | None = None


class WandbIntegration(BaseModel):
    project: str
    name: str | None = None
    entity: str | None = None
    tags: list[str] | None = None


class Integration(BaseModel):
    type: Literal["wandb"]
    wandb: WandbIntegration


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    training_file: Annotated[str, Field(min_length=1, max_length=64)]
    validation_file: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    method: Method | None = None
    hyperparameters: SupervisedHyperparameters | None = None
    """Deprecated in favour of `method`; accepted as the supervised method's hyperparameters."""
    suffix: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    seed: Annotated[int, Field(strict=True, ge=0, le=2147483647)] | None = None
    integrations: Annotated[list[Integration], Field(max_length=5)] | None = None
    metadata: dict[str, str] | None = None
    export_merged: bool = False
    """Extension: also publish the adapter merged into its base as a whole model, verified against the
    adapter (lora, dora and qlora; docs/models.md)."""

    @field_validator("suffix")
    @classmethod
    def _suffix_chars(cls, value: str | None) -> str | None:
        # The suffix is one `:`-separated segment of the fine_tuned_model name.
        if value is not None and (":" in value or any(ch.isspace() or not ch.isprintable() for ch in value)):
            raise ValueError("the suffix must not contain ':', whitespace or control characters")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
        for key, item in value.items():
            if not 1 <= len(key) <= MAX_METADATA_KEY:
                raise ValueError(f"keys must be 1 to {MAX_METADATA_KEY} characters")
            if len(item) > MAX_METADATA_VALUE:
                raise ValueError(f"values must be at most {MAX_METADATA_VALUE} characters")
            if "\0" in key + item:
                # Postgres cannot store it (SQLite can): refused on both, so metadata means the same on each.
                raise ValueError("keys and values must not contain NUL characters")
        return value


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
    evaluation: dict[str, Any] | None
    """Baseline vs tuned metrics and the best checkpoint, once the job has a validation file and has
    started (docs/evaluation.md)."""

    @classmethod
    def of(cls, job: Job) -> "FineTuningJob":
        # Until the job starts, the requested values (possibly "auto") are shown; then the resolved ones.
        method_type = job.method["type"]
        hyperparameters = job.hyperparameters or job.method[method_type]["hyperparameters"]
        method = {"type": method_type, method_type: {"hyperparameters": hyperparameters}}
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
            evaluation=job.evaluation,
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
