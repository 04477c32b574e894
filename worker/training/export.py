"""Merged export of a LoRA-family adapter (lora, dora, qlora): the adapter folded into its base as one whole
float32 Hugging Face model (safetensors, loadable by the auto class of its head), published only once
verified.

The caller's trained model is left as it was: the adapter's tensors are copied onto a freshly loaded base,
and that copy is what merges. The merge is always done and verified in float32, whatever dtype the base
trained in: rounding W + s·BA into a half dtype is the silent damage merges do. Measured on SmolLM2-135M
with a LoRA of r=16 on every linear layer, a bfloat16 merge differed from the adapter on its base by up to
2.6 logits (the adapter itself moved them by 2.3; bfloat16 inference differs from float32 by 1.6), a
float16 merge by 0.14: no tolerance could tell a good merge from a broken one there.

Checks, in order; any failure raises ExportMismatch and writes nothing:

1. the fresh base is the one the adapter trained on: every frozen base tensor equal to the trained
   model's (4-bit packed weights excepted);
2. the merged model reproduces the adapter on that same float32 base within `atol` on every prompt;
3. for lora and dora trained in float32, the merged model also reproduces the caller's trained model.
   Otherwise the gap is reported, not checked: a qlora adapter trained on the 4-bit base and its merge is
   onto the float base (a merged model must be a plain float model), so the two differ by the
   quantisation error; a half-precision trained model differs by its own rounding;
4. the saved directory, reloaded through the auto class, reproduces the merged model.

The model is saved into a staging directory beside `directory` and renamed into place only after check 4.
"""

import copy
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from models.spec import LORA_FAMILY
from worker.training.device import DeviceConfig
from worker.training.loading import load_model
from worker.training.methods import task_type

DEFAULT_ATOL = 1e-3
"""Largest |Δlogit| allowed between float32 models that should compute the same thing. A float32 merge is
exact but for rounding W + s·BA once instead of adding the two paths' outputs, which reorders the
arithmetic: measured on SmolLM2-135M (30 layers, logits up to ~25) with r=16 on every linear layer, the
merged model differs from the adapter on its base by 0.8e-4 to 1.0e-4 (lora, dora, a base trained in
bfloat16; the tiny test model: ~1e-6). 1e-3 leaves 10x headroom for deeper and wider models while staying
far below what a broken merge shows: a dropped, mis-scaled or misplaced update moves logits by about as
much as the adapter does (0.5 to 1.8 there), which the report states as `adapter_effect`."""


class ExportMismatch(Exception):
    """The merged model is not what the adapter on its base computes: the export is not published."""

    def __init__(
        self, message: str, *, prompt: int | None = None, max_abs_diff: float | None = None, atol: float = 0.0
    ) -> None:
        super().__init__(f"merged export failed verification: {message}; nothing was exported")
        self.prompt, self.max_abs_diff, self.atol = prompt, max_abs_diff, atol


@dataclass(frozen=True)
class Comparison:
    max_abs_diff: float
    """Over every prompt and logit (inf when a logit is not finite)."""
    worst_prompt: int
    argmax_agreement: float
    """Share of positions (rows of logits) whose top-1 agrees. Not a check of its own: at a margin above
    2·atol a flip needs some |Δlogit| > atol, which already fails; flips at closer ties are rounding."""


@dataclass(frozen=True)
class ExportReport:
    directory: Path
    method: str
    atol: float
    merge: Comparison
    """Merged model against the adapter on the same float32 base (checked)."""
    trained: Comparison
    trained_checked: bool
    """Whether `trained` (merged model against the caller's trained model) was held to atol: lora and dora
    trained in float32. Otherwise it is the gap to the 4-bit (qlora) or half-precision model trained."""
    reload: Comparison
    """The saved directory, reloaded, against the merged model (checked)."""
    adapter_effect: float
    """Max |Δlogit| the adapter makes over its base: a merge that dropped the adapter would differ by this
    much, so the checks can only see that when it exceeds atol."""

    def summary(self) -> str:
        """One line for the job's events."""
        trained = "checked" if self.trained_checked else "reported only"
        return (
            f"Merged export verified (max |Δlogit|, tolerance {self.atol:g}): merged vs adapter on its base "
            f"{self.merge.max_abs_diff:.2e}, vs the trained model {self.trained.max_abs_diff:.2e} "
            f"({trained}), "
            f"reloaded vs merged {self.reload.max_abs_diff:.2e}; the adapter itself moves logits by "
            f"{self.adapter_effect:.3g}"
        )


AUTO_CLASSES: dict[TaskType, Any] = {
    TaskType.CAUSAL_LM: AutoModelForCausalLM,
    TaskType.SEQ_CLS: AutoModelForSequenceClassification,
    TaskType.TOKEN_CLS: AutoModelForTokenClassification,
}


def check_mergeable(method: str) -> None:
    # The API refuses export_merged for other methods at create time; this guards direct callers.
    if method not in LORA_FAMILY:
        raise ValueError(f"merged export applies to lora, dora and qlora; {method} artifacts are not LoRA")


@contextmanager
def full_float32_matmuls() -> Iterator[None]:
    # TF32 matmuls (if a process enabled them) round to 10 bits and would swamp a 1e-3 tolerance.
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


def prompt_logits(model: nn.Module, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The model's logits (float32, on the CPU) on each prompt, one at a time (no padding to get wrong),
    in eval mode without grad; the model's train/eval mode is restored."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [
                model(input_ids=torch.tensor([list(row)], device=device), use_cache=False)
                .logits.float()
                .cpu()
                for row in prompts
            ]
    finally:
        model.train(was_training)


def compare(
    expected: Sequence[torch.Tensor],
    actual: Sequence[torch.Tensor],
    atol: float,
    what: str,
    check: bool = True,
) -> Comparison:
    """Max |Δlogit| and top-1 agreement of `actual` against `expected`, prompt by prompt; raises
    ExportMismatch naming `what` when `check` and a logit is off by more than atol or not finite."""
    worst, worst_prompt, agree, positions = -1.0, 0, 0, 0
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        diff = (want - got).abs()
        # NaN compares false with everything, so a NaN logit would otherwise pass any tolerance.
        max_diff = diff.max().item() if torch.isfinite(diff).all() else float("inf")
        if max_diff > worst:
            worst, worst_prompt = max_diff, index
        agree += int((want.argmax(-1) == got.argmax(-1)).sum())
        positions += want[..., 0].numel()
    if check and worst > atol:
        raise ExportMismatch(
            f"{what} differ on prompt {worst_prompt} by max |Δlogit| {worst:.3g} > tolerance {atol:.3g}",
            prompt=worst_prompt,
            max_abs_diff=worst,
            atol=atol,
        )
    return Comparison(worst, worst_prompt, agree / positions)


def adapter_on(base: PreTrainedModel, adapted: PeftModel) -> PeftModel:
    """The adapter of `adapted` (with any trained head copies, `modules_to_save`) on another copy of its
    base, its tensors copied exactly."""
    reference = get_peft_model(base, copy.deepcopy(adapted.active_peft_config))
    state = get_peft_model_state_dict(adapted)
    set_peft_model_state_dict(reference, state)
    copied = get_peft_model_state_dict(reference)
    if copied.keys() != state.keys() or not all(
        torch.equal(copied[name].cpu(), tensor.cpu().to(copied[name].dtype)) for name, tensor in state.items()
    ):
        raise ValueError("the adapter's tensors did not copy onto the freshly loaded base")
    return reference


def check_same_base(reference: PeftModel, adapted: PeftModel) -> None:
    """Every frozen base tensor of `reference` equals the trained model's, compared in the coarser of their
    dtypes (a base trained in bfloat16 is float32 here). Skipped: 4-bit packed weights, and a new head's
    untrained original (random on every load; its trained copy is the adapter's)."""
    trained = dict(adapted.named_parameters())
    for name, fresh in reference.named_parameters():
        old = trained.get(name)
        if fresh.requires_grad or ".original_module." in name:
            continue
        if old is not None and (getattr(old, "quant_state", None) is not None or not old.is_floating_point()):
            continue
        if old is not None and old.shape == fresh.shape:
            coarse = max(fresh.dtype, old.dtype, key=lambda dtype: torch.finfo(dtype).eps)
            if torch.equal(fresh.detach().to(old.device, coarse), old.detach().to(coarse)):
                continue
        raise ExportMismatch(
            f"the base loaded for export is not the one the adapter trained on ({name} differs)"
        )


def export_merged(
    adapted: nn.Module,
    method: str,
    base_loader: Callable[[], PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    directory: Path,
    *,
    atol: float = DEFAULT_ATOL,
    extras: Callable[[Path], None] | None = None,
) -> ExportReport:
    """Merge the trained adapter `adapted` (the PeftModel of `method`) into a fresh float32 copy of its base,
    verify it on `prompts` (token-id rows, a handful of held-out ones), and save it with the tokenizer and
    whatever `extras` writes into the (staging) directory as `directory`, which must not exist yet.

    `base_loader` loads the base as training did, with the same head and in the same dtype, but without
    4-bit quantisation; on any device (the CPU spares GPU memory). Raises ExportMismatch, with nothing
    written, when a check fails (see the module docstring); ValueError for what cannot merge."""
    check_mergeable(method)
    config = getattr(adapted, "active_peft_config", None)
    if not isinstance(adapted, PeftModel) or not isinstance(config, LoraConfig):
        raise ValueError(f"a {method} export needs the trained LoRA PeftModel, not {type(adapted).__name__}")
    if bool(config.use_dora) != (method == "dora"):
        raise ValueError(f"the adapter's use_dora={config.use_dora} does not match method {method!r}")
    if not prompts or not all(prompts):
        raise ValueError("merged export needs at least one non-empty prompt to verify on")
    if directory.exists():
        raise FileExistsError(f"{directory} exists; a merged export is written once")

    with full_float32_matmuls():
        trained = prompt_logits(adapted, prompts)
        base = base_loader()
        if getattr(base.config, "quantization_config", None) is not None:
            # Merging into a quantised base requantises the merged weights: lossy, and not a float model.
            raise ValueError("base_loader must load the unquantised base; a merged export is a float model")
        # transformers types `to` as torch's unbound Module.to (functools.wraps), missing `self`.
        reference = adapter_on(base.to(torch.float32), adapted)  # pyright: ignore[reportArgumentType]
        check_same_base(reference, adapted)
        expected = prompt_logits(reference, prompts)
        with reference.disable_adapter():
            untouched = prompt_logits(reference, prompts)
        adapter_effect = compare(untouched, expected, atol, "", check=False).max_abs_diff

        # safe_merge checks each merged weight for NaN/inf before it replaces the base's.
        merged = reference.merge_and_unload(safe_merge=True)
        merged_logits = prompt_logits(merged, prompts)
        merge = compare(expected, merged_logits, atol, "the merged model and the adapter on its base")
        trained_checked = method != "qlora" and adapted.get_base_model().dtype == torch.float32
        against_trained = compare(
            trained, merged_logits, atol, "the merged and the trained model", check=trained_checked
        )

        auto_class, device = AUTO_CLASSES[task_type(merged)], next(merged.parameters()).device
        staging = directory.with_name(f".{directory.name}.partial-{uuid.uuid4().hex[:8]}")
        staging.mkdir(parents=True)
        try:
            merged.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            if extras is not None:
                extras(staging)
            del merged, reference, base  # the reload below is a second whole model
            reloaded = load_model(str(staging), DeviceConfig(device, torch.float32), auto_class)
            reload = compare(
                merged_logits, prompt_logits(reloaded, prompts), atol, "the saved and the merged model"
            )
            staging.rename(directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return ExportReport(
        directory, method, atol, merge, against_trained, trained_checked, reload, adapter_effect
    )
