"""The pre-flight estimate of a job request, as the API asks the inference server for it and as the server
answers (docs/preflight.md).

The API checks the request as job creation does, resolves its files to store keys and its base model and
sends a `PreflightRequest`; the inference server, which may load tokenizers, runs the training code's own data
loading on the files and answers with a `PreflightReport`. The API adds the duration, which needs the
database. Pure data, like `models.inference`.
"""

from typing import Any, Literal

from pydantic import BaseModel

from models.spec import DeviceInfo, Parallel

SCALING_EFFICIENCY: dict[Parallel, float] = {"single": 1.0, "ddp": 0.9, "fsdp": 0.7}
"""Weak-scaling efficiency, tokens/s on N devices / (N x tokens/s on one), that the duration estimate
assumes: bench/distributed.py measures it (docs/distributed.md); sharding pays an all-gather and a
reduce-scatter of every weight each step, data parallelism one all-reduce of the trained tensors."""


def scaling_efficiency(strategy: Parallel, devices: int) -> float:
    return 1.0 if devices == 1 else SCALING_EFFICIENCY[strategy]


class PreflightFile(BaseModel):
    id: str
    key: str
    """Its artifact-store key: the inference server reads it through its own store (no shared path)."""
    path: str = ""
    """Where the inference server has it (`inference.preflight.localized` fills this in)."""


class PreflightRequest(BaseModel):
    base_model_path: str
    """Where the base was registered; with object storage the server reads it by `base_content_hash`."""
    base_content_hash: str | None = None
    method: dict[str, Any]
    """The method as job creation stores it: `{"type": t, t: {"hyperparameters": {...}}}`."""
    training_file: PreflightFile
    validation_file: PreflightFile | None = None
    max_file_examples: int | None = None
    max_file_tokens: int | None = None
    device: DeviceInfo | None = None
    """The device the latest job trained on; None: estimate against the inference server's own."""
    devices: int = 1
    """`compute.devices`: memory is estimated per device for the strategy the method uses on them."""


class FileStats(BaseModel):
    id: str
    n_examples: int
    """Examples in the file."""
    n_rows: int
    """What training batches: examples after text documents are split into max_seq_length chunks, packing
    and dropping examples left without a trained token (the job's `n_train_examples`)."""
    n_tokens: int
    """Tokens one pass feeds the model, as the job's `trained_tokens` counts them (both rows of a pair)."""
    n_trained_tokens: int
    """Tokens whose prediction the loss takes (0 for classification and reward models, scored per row)."""
    n_truncated: int
    """Examples cut at max_seq_length."""
    max_example_tokens: int
    """The longest row as trained (at most max_seq_length): what a batch is padded to."""


class Segment(BaseModel):
    text: str
    trained: bool
    omitted_chars: int = 0
    """Characters left out of the middle of a long segment (shown as " … ")."""


class PreviewExample(BaseModel):
    n_tokens: int
    truncated: bool
    segments: list[Segment]
    """The example's first row as trained: a pair's preferred row, a text document's first chunk."""
    non_preferred_segments: list[Segment] | None = None
    """Preference pairs: the non-preferred row."""
    label: str | None = None
    """Classification: the example's label (the loss is on it, not on a token)."""


class MemoryBreakdown(BaseModel):
    weights: int
    trainable_and_optimizer: int
    activations: int


class Device(DeviceInfo):
    source: str
    """Where the device was learnt: the latest job's worker, or the inference server itself."""


class Memory(BaseModel):
    estimated_bytes: int
    """On each device the job trains on."""
    breakdown: MemoryBreakdown
    device: Device
    fits: bool | None
    """The estimate is within FIT_MARGIN of the device's memory (None: its memory is unknown)."""
    reason: str | None = None
    """Why it does not fit, when it does not."""
    devices: int = 1
    strategy: Parallel = "single"
    """How the job spreads over `devices`: single (one device), ddp (a whole replica on each, the batch
    split) or fsdp (weights, gradients and optimizer state sharded, the batch split)."""
    total_parameters: int
    trainable_parameters: int


class PreflightReport(BaseModel):
    method: Literal["supervised", "dpo", "reward_model"]
    training_type: str
    max_seq_length: int
    n_epochs: int
    """Passes over the training file the job makes ("auto" resolved as the job will; 1 for
    feature_extraction, which embeds the file once)."""
    hyperparameters: dict[str, Any]
    """Every hyperparameter as the job will resolve it."""
    learning_rate_test_examples: int = 0
    """The most examples the learning-rate range test of `learning_rate_multiplier: "auto"` trains on before
    the first step (it may stop early); 0 when the job runs none."""
    training_file: FileStats
    validation_file: FileStats | None
    loss_mask_preview: list[PreviewExample]
    memory: Memory
    warnings: list[str]
