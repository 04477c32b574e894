"""The pre-flight estimate's computation (docs/preflight.md): a job's files loaded by the training code
itself (validation, tokenization, truncation, packing), a loss-mask preview of the first examples, and a
memory estimate from the base model's config (no weights are read). Runs in the inference server, which the
API asks once it has checked the request as job creation does (`api/preflight`).
"""

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from models.hyperparameters import HYPERPARAMETERS, resolve
from models.objectives import GENERATIVE, Mismatch, objective_for
from models.preflight import (
    Device,
    FileStats,
    Memory,
    MemoryBreakdown,
    PreflightReport,
    PreflightRequest,
    PreviewExample,
    Segment,
)
from models.spec import LORA_FAMILY, ChildMessage, DataError, LogMessage, TrainingSpec
from models.validation import validate_job_files
from worker.training import data
from worker.training.data import IGNORE_INDEX, read_jsonl
from worker.training.device import describe, device_config, select_device
from worker.training.events import EventWriter
from worker.training.loading import count_parameters, load_tokenizer
from worker.training.methods import get_method, new_head
from worker.training.objectives import Example, Objective, get_objective
from worker.training.objectives.preference import Pair
from worker.training.recipe import BASE_TRAINING_TYPES, check_training_examples

PREVIEW_EXAMPLES = 3
MAX_SEGMENT_CHARS = 2000
"""A longer segment of the preview keeps its first and last half of this and says how much it left out."""
DECODE_CONTEXT = 4
"""Tokens decoded ahead of a segment, so a tokenizer that treats the start of a decode specially
(SentencePiece drops a leading space) renders the segment as it reads in its row."""
PER_TOKEN: frozenset[str] = GENERATIVE | {"token_classification"}
"""Objectives whose loss is on tokens; classification and reward models score a whole row."""

# The memory formula's constants (docs/preflight.md).
FIT_MARGIN = 0.9
"""`fits` leaves a tenth of the device to the framework, the allocator's fragmentation, the CUDA context."""
NF4_BYTES = 4.127 / 8
"""A 4-bit NF4 weight plus its double-quantised block constants (8-bit absmax per 64 weights)."""
FLOAT32_BYTES = 4
"""Adapters and gradients are float32 (PEFT keeps adapters in float32; a trained base keeps float32 masters),
and QLoRA's preparation upcasts the base's unquantised parameters to it."""
ADAMW_BYTES = 8
"""AdamW's two float32 moments per trained parameter."""
ACTIVATION_ELEMENTS = 34
"""Activation elements one transformer layer keeps for its backward pass, per token and hidden unit: measured
on a SmolLM2-135M LoRA step (docs/preflight.md). Korthikanti et al.'s analytic 17 (34 bytes in 16-bit) is for
a GPT layer; a Llama layer's gated MLP and its attention probabilities keep about twice that."""
ADAPTER_DROPOUT_ELEMENTS = 13
"""Added by LoRA's dropout (lora_dropout > 0): each adapted linear layer keeps a dropped copy of its input
(measured likewise, with every linear layer adapted)."""
LOGIT_BYTES = 12
"""Per scored position and vocabulary entry: the logits, their float32 copy for the loss, and its gradient."""


class CollectedEvents(EventWriter):
    """An objective's warnings (truncation, dropped examples), kept here instead of sent to a runner."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def emit(self, message: ChildMessage) -> None:
        if isinstance(message, LogMessage) and message.level == "warn":
            self.warnings.append(message.message)


@dataclass(frozen=True)
class Loaded:
    """One file as an objective loads it."""

    rows: Sequence[Example]
    truncated: int
    warnings: list[str]


@dataclass(frozen=True)
class ModelSize:
    """The model a job trains, counted on the meta device from the base's config."""

    base: int
    """Parameters of the base with the objective's head."""
    total: int
    """Parameters once the method is applied (the base's, and what the method adds)."""
    trainable: int
    quantized: int
    """QLoRA: the base's weights that load in 4 bits (its linear layers but the heads)."""
    hidden_size: int
    n_layers: int
    vocab_size: int
    """Of the language-model head, whose logits training computes; 0 for a classifier head."""


def estimate(request: PreflightRequest) -> PreflightReport:
    """The report on a job request that job creation accepts; DataError for what the job would fail on."""
    method_type = request.method["type"]
    requested = HYPERPARAMETERS[method_type].model_validate(request.method[method_type]["hyperparameters"])
    valid_file = request.validation_file
    train, valid = validate_job_files(
        Path(request.training_file.path),
        Path(valid_file.path) if valid_file else None,
        max_examples=request.max_file_examples,
    )
    objective = objective_for(method_type, train.format)
    if isinstance(objective, Mismatch):  # job creation saw the first example's format; validation saw all
        raise DataError("invalid_file_format", objective.message, objective.param)
    hp = resolve(requested, train.n_examples, objective)
    spec = TrainingSpec(
        job_id="preflight",
        base_model_path=request.base_model_path,
        training_file=request.training_file.path,
        validation_file=valid_file.path if valid_file else None,
        data_format=train.format,
        objective=objective,
        labels=list(train.labels),
        output_dir="",
        stop_file="",
        seed=0,
        hyperparameters=hp,
        max_training_tokens=request.max_file_tokens,
    )
    tokenizer = load_tokenizer(request.base_model_path)
    training = load(spec, tokenizer, spec.training_file, "training_file")
    try:
        check_training_examples(training.rows, spec.max_training_tokens)
    except ValueError as error:
        message = f"The job would fail: {error} (max_seq_length={hp.max_seq_length})."
        raise DataError("invalid_example", message, "training_file") from error
    warnings = list(training.warnings)
    validation = None
    if valid_file and valid:
        # Validation is never packed; loaded as an objective loads training files, so its cuts are counted.
        loaded = load(unpacked(spec), tokenizer, valid_file.path, "validation_file")
        validation = file_stats(spec, valid_file.id, valid.n_examples, loaded)
        if loaded.truncated:
            warnings.append(
                f"{loaded.truncated} validation examples exceed max_seq_length={hp.max_seq_length} "
                "and will be truncated at the end"
            )
    if request.device is not None:
        device = Device(**request.device.model_dump(), source="the worker of the latest job to start")
    else:
        device = Device(**describe(select_device()).model_dump(), source="the inference server")
        warnings.append(
            "No job has reported its device yet: memory is estimated for the inference server's own."
        )
    memory = estimate_job_memory(spec, training.rows, device)
    if memory.fits is False:
        warnings.append(
            f"The estimated {memory.estimated_bytes / 2**30:.1f} GiB exceed {FIT_MARGIN:.0%} of the device's "
            f"{(device.total_bytes or 0) / 2**30:.1f} GiB: lower batch_size or max_seq_length, set "
            "gradient_checkpointing, or train with qlora."
        )
    return PreflightReport(
        method=method_type,
        training_type=hp.training_type,
        max_seq_length=hp.max_seq_length,
        n_epochs=1 if hp.training_type == "feature_extraction" else hp.n_epochs,
        hyperparameters=hp.model_dump(),
        training_file=file_stats(spec, request.training_file.id, train.n_examples, training),
        validation_file=validation,
        loss_mask_preview=preview(spec, tokenizer),
        memory=memory,
        warnings=warnings,
    )


def unpacked(spec: TrainingSpec) -> TrainingSpec:
    hyperparameters = spec.hyperparameters.model_copy(update={"packing": False})
    return spec.model_copy(update={"hyperparameters": hyperparameters})


def load(spec: TrainingSpec, tokenizer: PreTrainedTokenizerBase, path: str, param: str) -> Loaded:
    """A file's rows as the job's objective loads its training file, and the examples it cut."""
    events = CollectedEvents()
    objective: Objective = get_objective(spec.objective)(spec, tokenizer, device_config("cpu"), events)
    try:
        rows = objective.load_examples(path, "training")
    except ValueError as error:  # e.g. a chat template that cannot locate the assistant turns
        raise DataError("invalid_example", f"The job would fail: {error}", param) from error
    return Loaded(rows, objective.truncated, events.warnings)


def rows_of(example: Example) -> list[Any]:
    """The token rows an example feeds the model: both answers of a preference pair."""
    return [example.chosen, example.rejected] if isinstance(example, Pair) else [example]


def file_stats(spec: TrainingSpec, file_id: str, n_examples: int, loaded: Loaded) -> FileStats:
    rows = [row for example in loaded.rows for row in rows_of(example)]
    return FileStats(
        id=file_id,
        n_examples=n_examples,
        n_rows=len(loaded.rows),
        n_tokens=sum(row.length for row in rows),
        n_trained_tokens=sum(row.units for row in rows) if spec.objective in PER_TOKEN else 0,
        n_truncated=loaded.truncated,
        max_example_tokens=max((row.length for row in rows), default=0),
    )


def preview(spec: TrainingSpec, tokenizer: PreTrainedTokenizerBase) -> list[PreviewExample]:
    """The first training examples, each loaded alone by the objective (unpacked), as text runs marked by
    whether the loss is taken on them."""
    examples = []
    with tempfile.TemporaryDirectory(prefix="ftjobs-preflight-") as directory:
        for index, (_, record) in zip(range(PREVIEW_EXAMPLES), read_jsonl(spec.training_file), strict=False):
            path = Path(directory) / f"{index}.jsonl"
            path.write_text(json.dumps(record) + "\n", encoding="utf-8")
            loaded = load(unpacked(spec), tokenizer, str(path), "training_file")
            rows = [row for example in loaded.rows for row in rows_of(example)]
            pairs = spec.data_format == "preference"
            label = getattr(loaded.rows[0], "label", None) if loaded.rows else None
            examples.append(
                PreviewExample(
                    n_tokens=sum(row.length for row in rows),
                    truncated=loaded.truncated > 0,
                    # One row: a pair's preferred one, a long text document's first chunk.
                    segments=segments(spec, tokenizer, rows[0]) if rows else [],
                    non_preferred_segments=segments(spec, tokenizer, rows[1]) if pairs and rows else None,
                    label=spec.labels[label] if label is not None else None,
                )
            )
    return examples


def trained_mask(spec: TrainingSpec, row: Any) -> list[bool]:
    """Which tokens of a row the loss is taken on: exactly those its `units` counts."""
    labels = getattr(row, "labels", None)
    if labels is None or spec.objective not in PER_TOKEN:
        return [False] * row.length
    mask = [label != IGNORE_INDEX for label in labels]
    if isinstance(row, data.Example):  # a language model never predicts a row's first token
        mask[0] = False
    return mask


def segments(spec: TrainingSpec, tokenizer: PreTrainedTokenizerBase, row: Any) -> list[Segment]:
    mask = trained_mask(spec, row)
    ids: list[int] = row.input_ids
    found = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            found.append(clipped(decode(tokenizer, ids, start, end), mask[start]))
            start = end
    return found


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int], start: int, end: int) -> str:
    """`ids[start:end]` as text, special tokens included."""
    context = max(0, start - DECODE_CONTEXT)
    before, through = tokenizer.decode(ids[context:start]), tokenizer.decode(ids[context:end])
    return through[len(before) :] if through.startswith(before) else tokenizer.decode(ids[start:end])


def clipped(text: str, trained: bool) -> Segment:
    if len(text) <= MAX_SEGMENT_CHARS:
        return Segment(text=text, trained=trained)
    half = MAX_SEGMENT_CHARS // 2
    omitted = len(text) - 2 * half
    return Segment(text=f"{text[:half]} … {text[-half:]}", trained=trained, omitted_chars=omitted)


def estimate_job_memory(spec: TrainingSpec, rows: Sequence[Example], device: Device) -> Memory:
    """The memory a job takes on `device`, by the device rules training follows (`device.device_config`)."""
    hp = spec.hyperparameters
    size = model_size(spec)
    rules = device_config(device.type, trains_base_weights=hp.training_type in BASE_TRAINING_TYPES)
    token_rows = [row for example in rows for row in rows_of(example)]
    breakdown = estimate_memory(
        size,
        base_bytes=FLOAT32_BYTES if hp.training_type == "qlora" else rules.dtype.itemsize,
        activation_bytes=(rules.compute_dtype or rules.dtype).itemsize,
        rows=hp.batch_size * len(rows_of(rows[0])),
        seq_length=max(row.length for row in token_rows),
        scored_positions=max(row.units for row in token_rows) if spec.objective in GENERATIVE else 0,
        # QLoRA always checkpoints (methods/qlora.py): memory is why anyone picks it. On CPU glibc keeps the
        # recomputation's freed temporaries resident, so checkpointing is not credited there: the estimate
        # errs high (measured 1.6x) rather than 9x low (docs/preflight.md).
        checkpointing=(hp.gradient_checkpointing or hp.training_type == "qlora") and device.type == "cuda",
        adapter_dropout=hp.training_type in LORA_FAMILY and hp.lora_dropout > 0,
        trains=hp.training_type != "feature_extraction",
    )
    total = breakdown.weights + breakdown.trainable_and_optimizer + breakdown.activations
    return Memory(
        estimated_bytes=total,
        breakdown=breakdown,
        device=device,
        fits=None if device.total_bytes is None else total <= FIT_MARGIN * device.total_bytes,
        total_parameters=size.total,
        trainable_parameters=size.trainable,
    )


def estimate_memory(
    size: ModelSize,
    *,
    base_bytes: int,
    activation_bytes: int,
    rows: int,
    seq_length: int,
    scored_positions: int,
    checkpointing: bool,
    adapter_dropout: bool,
    trains: bool,
) -> MemoryBreakdown:
    """The formula (docs/preflight.md), in one place. `rows`: token rows in one batch (a pair is two);
    `seq_length`: the longest row, which a batch is padded to; `scored_positions`: the most positions of one
    row whose next token is scored (training computes logits only there)."""
    added = size.total - size.base
    weights = (size.base - size.quantized) * base_bytes + size.quantized * NF4_BYTES + added * FLOAT32_BYTES
    trainable = size.trainable * (FLOAT32_BYTES + ADAMW_BYTES)
    per_element = rows * seq_length * size.hidden_size * activation_bytes
    layer = ACTIVATION_ELEMENTS + (ADAPTER_DROPOUT_ELEMENTS if adapter_dropout else 0)
    if not trains:  # a forward pass without grad keeps one layer's activations at a time
        activations = per_element * layer
    elif checkpointing:  # each layer's input is kept; one layer's activations are recomputed at a time
        activations = per_element * (size.n_layers + layer)
    else:
        activations = per_element * size.n_layers * layer
    if trains:
        activations += rows * scored_positions * size.vocab_size * LOGIT_BYTES
    return MemoryBreakdown(weights=int(weights), trainable_and_optimizer=trainable, activations=activations)


def model_size(spec: TrainingSpec) -> ModelSize:
    """Parameter counts of the job's model, built on the meta device from the base's config and prepared by
    the job's method (so LoRA targets, frozen layers, learned prompts count as they will)."""
    hp = spec.hyperparameters
    auto_class, options = head(spec)
    config = AutoConfig.from_pretrained(
        spec.base_model_path, trust_remote_code=False, local_files_only=True, **options
    )
    with torch.device("meta"):
        base = auto_class.from_config(config)
    n_base = count_parameters(base.parameters())
    quantized = quantizable(base) if hp.training_type == "qlora" else 0
    vocab_size = base.config.get_text_config().vocab_size if auto_class is AutoModelForCausalLM else 0
    model: nn.Module = base
    if hp.training_type != "feature_extraction":
        try:
            model = get_method(hp.training_type).prepare(base, hp)
        except ValueError as error:  # e.g. freeze on a model whose blocks it cannot tell
            raise DataError(
                "invalid_hyperparameters", f"The job would fail: {error}", "method.hyperparameters"
            ) from error
    text = base.config.get_text_config()
    return ModelSize(
        base=n_base,
        total=count_parameters(model.parameters()),
        trainable=count_parameters(p for p in model.parameters() if p.requires_grad)
        if hp.training_type != "feature_extraction"
        else 0,
        quantized=quantized,
        hidden_size=text.hidden_size,
        n_layers=text.num_hidden_layers,
        vocab_size=vocab_size,
    )


def head(spec: TrainingSpec) -> tuple[Any, dict[str, Any]]:
    """The auto class and head size each objective's `load_model` puts on the base (feature extraction: the
    bare base, whose states it pools)."""
    if spec.hyperparameters.training_type == "feature_extraction":
        return AutoModel, {}
    if spec.objective == "classification":
        return AutoModelForSequenceClassification, {"num_labels": len(spec.labels)}
    if spec.objective == "token_classification":
        return AutoModelForTokenClassification, {"num_labels": len(spec.labels)}
    if spec.objective == "reward":
        return AutoModelForSequenceClassification, {"num_labels": 1}
    return AutoModelForCausalLM, {}


def quantizable(model: PreTrainedModel) -> int:
    """Weights QLoRA loads in 4 bits: the linear layers', but the output head's and a new classifier head's
    (transformers and `methods.qlora` keep those in full precision)."""
    output = model.get_output_embeddings()
    heads = [name for name, module in model.named_modules() if output is not None and module is output]
    heads += new_head(model)
    return sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name == h or name.startswith(f"{h}.") for h in heads)
    )
