"""What the job runner hands to a training child process, and what the child reports back.

Pure data (pydantic, no database, no torch): the runner writes a `TrainingSpec` as JSON, the child
writes one `ChildMessage` per line on an inherited pipe. Training code imports only this module from
`models/`.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

DataFormat = Literal[
    "chat", "prompt_completion", "text", "classification", "token_classification", "preference", "prompts"
]
"""`prompts`: chat messages ending with the user's, plus fields for graders (a reinforcement file)."""
MethodType = Literal["supervised", "dpo", "reinforcement", "reward_model"]
"""OpenAI's `method.type` values we train, plus `reward_model` (an extension)."""
Objective = Literal["sft", "pretrain", "classification", "token_classification", "dpo", "reward", "grpo"]
"""What a job learns; it follows from the method type and the training file's format."""
TrainingType = Literal[
    "lora",
    "dora",
    "qlora",
    "full",
    "freeze",
    "bitfit",
    "ia3",
    "prompt_tuning",
    "prefix_tuning",
    "p_tuning",
    "feature_extraction",
]
ALL_OBJECTIVES: frozenset[Objective] = frozenset(get_args(Objective))
LORA_KNOBS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


Parallel = Literal["ddp", "fsdp", "single"]


@dataclass(frozen=True)
class MethodTraits:
    """What the API, the runner, the pre-flight, the trainer and the inference server know of a training
    method; its code (how it prepares, saves and loads a model) is `worker/training/methods/<name>.py`."""

    family: Literal["lora", "virtual_token", "adapter", "base_weights", "features"]
    """lora: low-rank adapters (mergeable); virtual_token: a learned prompt; adapter: another
    PEFT adapter; base_weights: the base's own weights train (float32 master weights); features: no
    gradient steps (a classifier solved on frozen embeddings)."""
    base_learning_rate: float
    """What `learning_rate_multiplier` scales: a whole model needs small steps, a learned prompt large
    ones."""
    objectives: frozenset[Objective] = ALL_OBJECTIVES
    knobs: tuple[str, ...] = ()
    """The hyperparameter extensions only this method (and those that share them) accepts."""
    shares_base: bool = False
    """Served as an adapter on its base, batched with other adapters and the base itself (peft's mixed
    adapter batches), rather than as a dedicated model; peft can't mix DoRA adapters."""
    parallel: Parallel = "ddp"
    """How a job on several devices trains: ddp replicates the model and sums the (small) trained tensors'
    gradients across ranks; fsdp shards a whole model's weights, gradients and optimizer state over the
    ranks (FSDP2); single never runs on more than one."""

    @property
    def trains_base_weights(self) -> bool:
        return self.family == "base_weights"


# A decoder scores its last non-padding token, found from input_ids; a learned prompt is fed as
# embeddings, so right-padded rows would be scored at their padding: no reward models.
_PROMPT_OBJECTIVES = ALL_OBJECTIVES - {"reward"}
METHODS: dict[str, MethodTraits] = {
    "lora": MethodTraits("lora", 2e-4, knobs=LORA_KNOBS, shares_base=True),
    "dora": MethodTraits("lora", 2e-4, knobs=LORA_KNOBS),
    "qlora": MethodTraits("lora", 2e-4, knobs=LORA_KNOBS, shares_base=True),
    "full": MethodTraits("base_weights", 2e-5, parallel="fsdp"),
    "freeze": MethodTraits("base_weights", 5e-5, knobs=("trainable_layers",), parallel="fsdp"),
    "bitfit": MethodTraits("base_weights", 1e-3),
    "ia3": MethodTraits("adapter", 3e-3),
    "prompt_tuning": MethodTraits("virtual_token", 3e-2, _PROMPT_OBJECTIVES, ("num_virtual_tokens",)),
    "prefix_tuning": MethodTraits("virtual_token", 1e-2, _PROMPT_OBJECTIVES, ("num_virtual_tokens",)),
    "p_tuning": MethodTraits("virtual_token", 1e-2, _PROMPT_OBJECTIVES, ("num_virtual_tokens",)),
    # The logistic-regression head is solved directly: the rate is never used.
    "feature_extraction": MethodTraits("features", 1.0, frozenset({"classification"}), parallel="single"),
}
"""Every training method, one row each: `TrainingType` lists the same names."""
if set(METHODS) != set(get_args(TrainingType)):
    raise TypeError(f"TrainingType and METHODS disagree: {set(METHODS) ^ set(get_args(TrainingType))}")


def family(name: str) -> frozenset[str]:
    return frozenset(method for method, traits in METHODS.items() if traits.family == name)


LORA_FAMILY = family("lora")
VIRTUAL_TOKEN_METHODS = family("virtual_token")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
"""Weight files that are pickles, which can run code when loaded: base models and artifacts hold safetensors
only, and nothing pulls, loads or serves these."""


def pickle_weights(directory: Path) -> list[str]:
    """The pickle weight files under a model or artifact directory, relative to it."""
    found = (path for path in directory.rglob("*") if path.name.endswith(PICKLE_SUFFIXES))
    return sorted(str(path.relative_to(directory)) for path in found)


def greater_is_better(metric: str) -> bool:
    """Losses and perplexity improve downwards; every other metric we report improves upwards."""
    return not metric.endswith(("loss", "perplexity"))


class ResolvedHyperparameters(BaseModel):
    """Concrete values a job trains with ("auto" already resolved). Each field's default is what an unset
    request field resolves to (the one place defaults live); its docstring is the request field's
    description in the OpenAPI schema (`models.hyperparameters`)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    training_type: TrainingType = "lora"
    """How the model's weights are adapted (docs/methods.md compares the methods)."""
    n_epochs: int
    """Passes over the training file."""
    batch_size: int
    """Examples per optimizer step (before gradient accumulation)."""
    learning_rate_multiplier: float
    """Scales the training type's base learning rate."""
    learning_rate: float
    """The learning rate itself; given, it overrides the multiplier, which is then shown relative to the
    base rate."""
    learning_rate_search: bool = False
    """learning_rate_multiplier "auto": a range test before the first step replaces the learning rate and
    multiplier (1 until then) with the one it finds, and turns this off (worker/training/lr_range.py)."""
    lora_r: int = 8
    """Rank of the low-rank adapters."""
    lora_alpha: float = 16.0
    """Scale of the adapters' update (applied as lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the adapters' input."""
    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """The linear layers that get adapters, by module name, or every linear layer but the head."""
    max_seq_length: int = 1024
    """Tokens per example; longer examples are truncated (a `warn` event says how many), raw text is cut
    into chunks of this length."""
    warmup_ratio: float = 0.05
    """Share of the steps over which the learning rate warms up linearly."""
    trainable_layers: int = 2
    """How many of the last transformer layers train (0: only the head)."""
    num_virtual_tokens: int = 20
    """Length of the learned prompt."""
    # Optimisation.
    gradient_accumulation_steps: int = 1
    """Batches whose gradients add up to one optimizer step; the loss is averaged over the whole step."""
    weight_decay: float = 0.0
    """AdamW weight decay, on matrices only (never on biases and norms)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this norm."""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """How the learning rate moves after warmup."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more time (qlora always does)."""
    # Batching.
    packing: bool = False
    """Examples share rows up to max_seq_length, never attending across each other."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding), in a seeded order."""
    # Evaluation.
    eval_steps: int = 0
    """Also evaluate (and checkpoint) every N optimizer steps; 0: at each epoch end only."""
    metric_for_best_checkpoint: str = "full_valid_loss"
    """The full-evaluation metric (with or without `full_valid_`) that names the best checkpoint."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improving metric_for_best_checkpoint (0: never)."""
    generation_eval_samples: int = 16
    """Validation examples whose assistant answer is checked by exact match of a greedy generation."""
    # Preference objectives.
    beta: float = 0.1
    """How far the tuned policy may move from the base (higher: more conservative); in reinforcement
    jobs, the weight of the KL penalty to the starting model."""
    # Reinforcement (GRPO).
    compute_multiplier: float = 1.0
    """Scales the answers sampled per prompt (a group): round(4 * compute_multiplier), at least 2."""
    eval_interval: int = 0
    """Reinforcement: evaluate (and checkpoint) every N steps, as eval_steps does (0: each epoch end)."""
    eval_samples: int = 1
    """Reinforcement: answers per validation prompt in an evaluation (1: the greedy answer)."""
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"
    """Accepted for OpenAI compatibility; the models served here do not reason, so it changes nothing."""
    max_completion_tokens: int = 64
    """Reinforcement: the longest answer sampled for a prompt, in tokens."""

    @property
    def group_size(self) -> int:
        """Answers sampled per prompt in a reinforcement step."""
        return max(2, round(4 * self.compute_multiplier))

    def with_learning_rate(self, learning_rate: float, multiplier: float) -> "ResolvedHyperparameters":
        """These hyperparameters with the rate a range test settled: nothing left to search."""
        return self.model_copy(
            update={
                "learning_rate": learning_rate,
                "learning_rate_multiplier": multiplier,
                "learning_rate_search": False,
            }
        )


class DataError(Exception):
    """A file that cannot be trained on: the job fails with its code, message and param."""

    def __init__(self, code: str, message: str, param: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


class WandbTracker(BaseModel):
    """A W&B run named as the user asked; W&B's own environment (WANDB_MODE, WANDB_API_KEY, WANDB_BASE_URL)
    says where it goes."""

    type: Literal["wandb"] = "wandb"
    project: str
    name: str | None = None
    entity: str | None = None
    tags: list[str] = []
    run_id: str
    """The job id, as OpenAI does: every attempt of a job logs to the same run."""
    dir: str


class MlflowTracker(BaseModel):
    type: Literal["mlflow"] = "mlflow"
    tracking_uri: str
    experiment_name: str
    run_name: str | None = None
    tags: dict[str, str] = {}


class TensorboardTracker(BaseModel):
    type: Literal["tensorboard"] = "tensorboard"
    log_dir: str


Tracker = Annotated[WandbTracker | MlflowTracker | TensorboardTracker, Field(discriminator="type")]
"""One of a job's `integrations`: the names are the user's, the destination is the operator's."""


class StartFrom(BaseModel):
    """The tuned model a job starts from, besides its registered base (models/continuation.py says how)."""

    path: str
    """The parent's artifact directory (adapter and tokenizer)."""
    mode: Literal["continue", "merge"]


class JudgeAccess(BaseModel):
    """How a reinforcement job's trainer asks its model graders' judges: the inference server, with a grant
    for the job's organisation and these models only (models/judge_grants.py)."""

    url: str
    grant_file: str | None
    """Where the worker keeps the job's current grant, renewed at each heartbeat; None when the inference
    server takes no token."""
    organization: str
    targets: dict[str, dict[str, Any]]
    """Each judge model's name → what the inference server loads for it (models/inference.py's Target)."""


class TrainingSpec(BaseModel):
    job_id: str
    base_model_path: str
    training_file: str
    validation_file: str | None = None
    data_format: DataFormat
    objective: Objective
    labels: list[str] = []
    """classification, token_classification: the training file's labels or tags, sorted; their index is
    the class id."""
    output_dir: str
    stop_file: str
    seed: int
    hyperparameters: ResolvedHyperparameters
    checkpoint_every_steps: int = 0
    """Also checkpoint every N optimizer steps (0: only at the end of each epoch)."""
    start_from: StartFrom | None = None
    """A fine-tuned model's adapter to continue, or to merge into the base first (models/continuation.py)."""
    resume_from: str | None = None
    """A complete checkpoint directory of an earlier attempt to continue from (same spec otherwise)."""
    export_merged: bool = False
    """Also save the adapter merged into the base, verified against it (lora family)."""
    publish_best: bool = False
    """Publish the weights of the best evaluated checkpoint (by metric_for_best_checkpoint), not the last."""
    best_checkpoint: str | None = None
    """The best checkpoint of earlier attempts (a resumed job's best may be from before it resumed)."""
    max_training_tokens: int | None = None
    """Refuse a training file that tokenizes to more (`settings.max_file_tokens`)."""
    trackers: list[Tracker] = []
    """Where the job's hyperparameters and metric curves are also logged (worker/training/trackers.py)."""
    devices: int = 1
    """Ranks on this machine, one per device (docs/distributed.md); 1 runs the plain child."""
    grader: dict[str, Any] | None = None
    """Reinforcement: the grader (OpenAI's shape, checked by the API) that scores sampled answers."""
    judge: JudgeAccess | None = None
    """Reinforcement with model graders: where their judges answer."""


Metrics = dict[str, float]
"""OpenAI's metric names where they exist (train_loss, train_mean_token_accuracy, valid_loss,
valid_mean_token_accuracy, full_valid_loss, full_valid_mean_token_accuracy), ours beside them under the same
prefixes (full_valid_perplexity, full_valid_accuracy, full_valid_macro_f1, ...); see docs/evaluation.md."""
Details = dict[str, Any]
"""Evaluation results that are not one number: per-class precision and recall, a confusion matrix, sample
generations."""


class EvaluationMessage(BaseModel):
    """A full evaluation on the validation file: of the untouched base (`baseline`, before any step) or of
    the model at a checkpoint step."""

    type: Literal["evaluation"] = "evaluation"
    step: int
    baseline: bool = False
    metrics: Metrics
    details: Details = {}


class DeviceInfo(BaseModel):
    """The hardware a job trains on, as its trainer sees it."""

    type: Literal["cpu", "cuda"]
    name: str
    total_bytes: int | None = None
    """Its memory (a CPU's: physical memory, or the container's limit); None where unknown."""


class LearningRateMessage(BaseModel):
    """How learning_rate_multiplier "auto" was resolved: the range test's curve and pick, or why the
    method's default rate was kept. Its cost is counted in examples processed, each test step one of the
    job's own optimizer steps (batch_size times gradient_accumulation_steps examples, forward, backward and
    update)."""

    type: Literal["learning_rate"] = "learning_rate"
    learning_rate: float
    learning_rate_multiplier: float
    found: bool
    """False: the default (multiplier 1) was kept, for `reason`."""
    reason: str
    steps: int
    """Test steps run; none when the test was skipped."""
    examples: int
    """Training examples the test processed (its cost)."""
    budget_steps: int
    """The most it could run: whole steps within 5 % of the examples the job's training processes, at
    most 48."""
    planned_examples: int
    """What the job's training processes: its epochs times its training examples."""
    total_steps: int
    rates: list[float] = []
    """The learning rate of each test step."""
    losses: list[float] = []
    """Its smoothed training loss."""
    diverged_at: float | None = None
    """The rate at which the test stopped because the loss blew up."""

    @property
    def cost(self) -> float:
        """The test's examples as a share of the training's."""
        return self.examples / self.planned_examples


class StartedMessage(BaseModel):
    type: Literal["started"] = "started"
    total_steps: int
    n_train_examples: int
    truncated_examples: int = 0
    device: DeviceInfo | None = None
    """Stored in the job's events: the pre-flight estimate sizes jobs for the latest device."""


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
    code: str | None = None
    """An error the data caused (`models.validation.DataError`): the job's error code, and its param."""
    param: str | None = None


class CompletedMessage(BaseModel):
    type: Literal["completed"] = "completed"
    step: int
    adapter_path: str
    merged_path: str | None = None
    """With export_merged: the verified merged model's directory."""
    results_csv: str
    trained_tokens: int
    metrics: Metrics
    published_step: int | None = None
    """The step whose weights were published when it is not `step`, the last (publish_best); `metrics` are
    that step's."""
    elapsed_seconds: float | None = None
    """Time in the training loop (steps, in-loop evaluations, checkpoints) over every attempt: with
    trained_tokens, the throughput the pre-flight estimate measures durations by."""


class StoppedMessage(BaseModel):
    """The child saw the stop file and ended training without publishing anything.

    A stop file containing `pause` asks for a checkpoint first; it is reported before this message.
    """

    type: Literal["stopped"] = "stopped"
    step: int


ChildMessage = Annotated[
    StartedMessage
    | LearningRateMessage
    | MetricsMessage
    | EvaluationMessage
    | CheckpointMessage
    | LogMessage
    | CompletedMessage
    | StoppedMessage,
    Field(discriminator="type"),
]
