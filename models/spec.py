"""What the job runner hands to a training child process, and what the child reports back.

Pure data (pydantic, no database, no torch): the runner writes a `TrainingSpec` as JSON, the child
writes one `ChildMessage` per line on an inherited pipe. Training code imports only this module from
`models/`.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, Field

DataFormat = Literal[
    "chat", "prompt_completion", "text", "classification", "token_classification", "preference"
]
SFT_FORMATS: frozenset[str] = frozenset({"chat", "prompt_completion"})
"""What the supervised recipe trains on today; the other formats belong to objectives still to come."""
TrainingType = Literal[
    "lora", "dora", "qlora", "full", "freeze", "bitfit", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning"
]
LORA_FAMILY: frozenset[str] = frozenset({"lora", "dora", "qlora"})
VIRTUAL_TOKEN_METHODS: frozenset[str] = frozenset({"prompt_tuning", "prefix_tuning", "p_tuning"})


class ResolvedHyperparameters(BaseModel):
    """Concrete values a job trains with ("auto" already resolved)."""

    training_type: TrainingType = "lora"
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: list[str] | Literal["all-linear"]
    max_seq_length: int
    warmup_ratio: float
    trainable_layers: int = 2
    """freeze: how many of the last transformer layers train (0: only the head)."""
    num_virtual_tokens: int = 20
    """prompt_tuning, prefix_tuning, p_tuning: length of the learned prompt."""


class TrainingSpec(BaseModel):
    job_id: str
    base_model_path: str
    training_file: str
    validation_file: str | None = None
    data_format: DataFormat
    output_dir: str
    stop_file: str
    seed: int
    hyperparameters: ResolvedHyperparameters
    checkpoint_every_steps: int = 0
    """Also checkpoint every N optimizer steps (0: only at the end of each epoch)."""
    resume_from: str | None = None
    """A complete checkpoint directory of an earlier attempt to continue from (same spec otherwise)."""


Metrics = dict[str, float]
"""OpenAI metric names: train_loss, train_mean_token_accuracy, valid_loss, valid_mean_token_accuracy,
full_valid_loss, full_valid_mean_token_accuracy."""


class StartedMessage(BaseModel):
    type: Literal["started"] = "started"
    total_steps: int
    n_train_examples: int
    truncated_examples: int = 0


class MetricsMessage(BaseModel):
    type: Literal["metrics"] = "metrics"
    step: int
    total_steps: int
    metrics: Metrics
    elapsed_seconds: float


class CheckpointMessage(BaseModel):
    type: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str
    metrics: Metrics


class LogMessage(BaseModel):
    type: Literal["log"] = "log"
    level: Literal["info", "warn", "error"] = "info"
    message: str


class CompletedMessage(BaseModel):
    type: Literal["completed"] = "completed"
    step: int
    adapter_path: str
    results_csv: str
    trained_tokens: int
    metrics: Metrics


class StoppedMessage(BaseModel):
    """The child saw the stop file and ended training without publishing anything.

    A stop file containing `pause` asks for a checkpoint first; it is reported before this message.
    """

    type: Literal["stopped"] = "stopped"
    step: int


ChildMessage = Annotated[
    StartedMessage | MetricsMessage | CheckpointMessage | LogMessage | CompletedMessage | StoppedMessage,
    Field(discriminator="type"),
]
