"""The memory a job takes on a device, for the pre-flight estimate (docs/preflight.md): counted from the base
model's config on the meta device (no weights are read) and sized by the device rules training follows."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
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
)

from inference.preflight.examples import rows_of
from models.objectives import GENERATIVE
from models.preflight import Device, Memory, MemoryBreakdown
from models.spec import LORA_FAMILY, METHODS, DataError, Parallel, TrainingSpec
from worker.training.device import device_config
from worker.training.loading import count_parameters, find_blocks
from worker.training.methods import get_method, new_head
from worker.training.objectives import Example

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
    block: int
    """Parameters of one transformer block (0 when the blocks are ambiguous): FSDP2's unit."""
    vocab_size: int
    """Of the language-model head, whose logits training computes; 0 for a classifier head."""


def estimate_job_memory(
    spec: TrainingSpec, rows: Sequence[Example], device: Device, devices: int = 1
) -> Memory:
    """The memory a job takes on each of its `devices`, by the device rules training follows
    (`device.device_config`) and the way its method spreads over several (`MethodTraits.parallel`)."""
    hp = spec.hyperparameters
    size = model_size(spec)
    rules = device_config(device.type, trains_base_weights=METHODS[hp.training_type].trains_base_weights)
    strategy = METHODS[hp.training_type].parallel if devices > 1 else "single"
    token_rows = [row for example in rows for row in rows_of(example)]
    breakdown = estimate_memory(
        size,
        base_bytes=FLOAT32_BYTES if hp.training_type == "qlora" else rules.dtype.itemsize,
        activation_bytes=(rules.compute_dtype or rules.dtype).itemsize,
        # Each rank trains its share of every batch.
        rows=math.ceil(hp.batch_size / devices) * len(rows_of(rows[0])),
        seq_length=max(row.length for row in token_rows),
        scored_positions=max(row.units for row in token_rows) if spec.objective in GENERATIVE else 0,
        # QLoRA always checkpoints (methods/qlora.py): memory is why anyone picks it. On CPU glibc keeps the
        # recomputation's freed temporaries resident, so checkpointing is not credited there: the estimate
        # errs high (measured 1.6x) rather than 9x low (docs/preflight.md).
        checkpointing=(hp.gradient_checkpointing or hp.training_type == "qlora") and device.type == "cuda",
        adapter_dropout=hp.training_type in LORA_FAMILY and hp.lora_dropout > 0,
        trains=hp.training_type != "feature_extraction",
    )
    breakdown = spread(breakdown, size, strategy, devices)
    total = breakdown.weights + breakdown.trainable_and_optimizer + breakdown.activations
    fits = None if device.total_bytes is None else total <= FIT_MARGIN * device.total_bytes
    return Memory(
        estimated_bytes=total,
        breakdown=breakdown,
        device=device,
        fits=fits,
        reason=None if fits is not False else not_fitting(total, device, strategy, devices),
        devices=devices,
        strategy=strategy,
        total_parameters=size.total,
        trainable_parameters=size.trainable,
    )


def spread(breakdown: MemoryBreakdown, size: ModelSize, strategy: Parallel, devices: int) -> MemoryBreakdown:
    """One device's share of the weights and trained state (activations are already per device). ddp keeps
    a whole replica and a flat copy of the trained tensors' gradients for their all-reduce; fsdp keeps 1/N
    of everything, plus the weights it gathers while computing: the root unit (embeddings, head: gathered
    through the forward) and two blocks (the one computing and the one prefetched)."""
    if strategy == "ddp":
        trained = breakdown.trainable_and_optimizer + size.trainable * FLOAT32_BYTES
        return breakdown.model_copy(update={"trainable_and_optimizer": trained})
    if strategy == "fsdp":
        per_weight = breakdown.weights / max(size.total, 1)
        gathered = (size.total - size.n_layers * size.block + 2 * size.block) * per_weight
        return breakdown.model_copy(
            update={
                "weights": int(breakdown.weights / devices + min(gathered, breakdown.weights)),
                "trainable_and_optimizer": breakdown.trainable_and_optimizer // devices,
            }
        )
    return breakdown


def not_fitting(total: int, device: Device, strategy: Parallel, devices: int) -> str:
    on = "one device" if devices == 1 else f"each of {devices} devices ({strategy})"
    advice = "lower batch_size or max_seq_length, set gradient_checkpointing, or train with qlora"
    if strategy != "fsdp" and devices > 1:
        advice += "; more devices do not help: each holds the whole model"
    elif strategy == "fsdp":
        advice += ", or add devices: each holds 1/N of the model"
    return (
        f"The estimated {total / 2**30:.1f} GiB on {on} exceed {FIT_MARGIN:.0%} of the device's "
        f"{(device.total_bytes or 0) / 2**30:.1f} GiB: {advice}."
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
        block=block_parameters(base),
        vocab_size=vocab_size,
    )


def block_parameters(model: PreTrainedModel) -> int:
    try:
        return count_parameters(find_blocks(model)[1][0].parameters())
    except ValueError:
        return 0


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
