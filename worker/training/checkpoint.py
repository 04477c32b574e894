"""Trainer checkpoints: the method's artifact (so every checkpoint is a usable model) plus everything a later
attempt of the same job needs to continue exactly where this one was.

`output_dir/checkpoints/step-{N}/`:
    <the method's artifact>          what `method.save` writes: a PEFT adapter, the whole model (full) or
                                     the trained tensors (freeze, bitfit), with the tokenizer (its chat
                                     template) and the objective's extras (labels.json), written by the
                                     recipe; the runner adds lineage.json when it stores the checkpoint
    trainer/trainable.safetensors    every parameter with requires_grad, by name; exact for every method
                                     (p-tuning's adapter holds its encoder's output, not the encoder)
    trainer/optimizer.safetensors    the optimizer's per-parameter state, as "{parameter index}.{name}"
    trainer/rng.safetensors          the torch CPU (and CUDA) generator states
    trainer/state.json               progress, the job fingerprint, optimizer param groups, scheduler,
                                     grad scaler and python RNG states
    COMPLETE                         written last; a directory without it is never resumed from

No pickle anywhere: tensors go to safetensors, everything else to JSON.
"""

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from models.spec import Metrics, TrainingSpec
from worker.training.methods import Method

FORMAT = 1
COMPLETE = "COMPLETE"
TRAINER_DIR = "trainer"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"


@dataclass
class Progress:
    """Where training stands, besides tensors: what a resumed run continues from."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    """Batches of `epoch` already trained (all of them once the epoch has ended)."""
    valid_cursor: int = 0
    trained_tokens: int = 0
    elapsed_seconds: float = 0.0
    history: list[tuple[int, Metrics]] = field(default_factory=list)
    """Every step's metrics so far, for the results CSV."""
    last_full_valid: Metrics = field(default_factory=dict)
    best_value: float | None = None
    """The best full evaluation of metric_for_best_checkpoint so far, for early stopping."""
    best_step: int | None = None
    """The step of `best_value`: its checkpoint is what publish_best publishes."""
    evaluations_since_best: int = 0


def job_fingerprint(spec: TrainingSpec, n_train_examples: int, n_valid_examples: int) -> dict[str, Any]:
    """What a checkpoint must share with the job resuming from it: the data order, the trained parameters
    and their optimisation all follow from these."""
    with open(spec.training_file, "rb") as file:
        training_sha256 = hashlib.file_digest(file, "sha256").hexdigest()
    return {
        **spec.hyperparameters.model_dump(mode="json"),
        "seed": spec.seed,
        "n_train_examples": n_train_examples,
        "n_valid_examples": n_valid_examples,
        "training_file_sha256": training_sha256,
    }


def save_checkpoint(
    directory: Path,
    *,
    method: Method,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler,
    progress: Progress,
    fingerprint: dict[str, Any],
) -> None:
    """Write into a hidden sibling, make it durable, rename it to `directory`, then mark it complete."""
    partial = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left behind by an attempt that died mid-write
    trainer_dir = partial / TRAINER_DIR
    trainer_dir.mkdir(parents=True)
    method.save(model, partial)

    trainable = {
        name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad
    }
    save_file(trainable, trainer_dir / TRAINABLE_FILE)
    # safetensors holds a flat name → tensor map: per-parameter state goes there, the param groups to JSON.
    optimizer_state = optimizer.state_dict()
    optimizer_tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, values in optimizer_state["state"].items()
        for name, value in values.items()
    }
    save_file(optimizer_tensors, trainer_dir / OPTIMIZER_FILE)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # the recipe trains on one device: the current one
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, trainer_dir / RNG_FILE)
    state = {
        "format": FORMAT,
        "job": fingerprint,
        "progress": asdict(progress),
        "optimizer_param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "grad_scaler": scaler.state_dict(),
        "python_rng": random.getstate(),
    }
    (trainer_dir / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")

    for path in partial.rglob("*"):
        _fsync(path)
    _fsync(partial)
    if directory.exists():  # the same step, written by an earlier attempt into this output_dir
        shutil.rmtree(directory)
    partial.rename(directory)
    _fsync(directory.parent)
    (directory / COMPLETE).touch()
    _fsync(directory / COMPLETE)
    _fsync(directory)


def read_progress(directory: Path, fingerprint: dict[str, Any]) -> Progress:
    """The progress saved in a complete checkpoint of this same job; anything else is refused."""
    state = _read_state(directory)
    saved = state["job"]
    differences = [
        f"{key} {saved.get(key)!r} there, {value!r} here"
        for key, value in fingerprint.items()
        if saved.get(key) != value
    ]
    if differences:
        raise ValueError(
            f"cannot resume from {directory}: it belongs to another job ({'; '.join(differences)})"
        )
    progress = state["progress"]
    return Progress(**{**progress, "history": [(step, metrics) for step, metrics in progress["history"]]})


def restore_state(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler,
) -> None:
    """Put the checkpoint's trained parameters, optimizer, scheduler, scaler and RNG states in place.

    Call it last in setup: preparing the model draws from the RNG that this restores."""
    state = _read_state(directory)
    trainer_dir = directory / TRAINER_DIR
    _copy_trainable(model, load_file(trainer_dir / TRAINABLE_FILE))

    per_parameter: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(trainer_dir / OPTIMIZER_FILE).items():
        index, name = key.split(".", 1)
        per_parameter.setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict({"state": per_parameter, "param_groups": state["optimizer_param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    # Empty when written without loss scaling (bf16, fp32): the scaler keeps its defaults then.
    if state["grad_scaler"]:
        scaler.load_state_dict(state["grad_scaler"])

    rng = load_file(trainer_dir / RNG_FILE)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))


def load_trained_weights(directory: Path, model: nn.Module) -> None:
    """Put a checkpoint's trained parameters (and nothing else of its state) into the model."""
    _copy_trainable(model, load_file(directory / TRAINER_DIR / TRAINABLE_FILE))


def _read_state(directory: Path) -> dict[str, Any]:
    if not (directory / COMPLETE).is_file():
        raise ValueError(f"cannot resume from {directory}: not a complete checkpoint (no {COMPLETE} file)")
    state = json.loads((directory / TRAINER_DIR / STATE_FILE).read_text(encoding="utf-8"))
    if state["format"] != FORMAT:
        raise ValueError(f"cannot resume from {directory}: checkpoint format {state['format']}, not {FORMAT}")
    return state


@torch.no_grad()
def _copy_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite the trainable parameters in place; names and shapes must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if {n: p.shape for n, p in params.items()} != {n: t.shape for n, t in tensors.items()}:
        raise ValueError("the checkpoint's trainable parameters are not this model's")
    for name, param in params.items():
        param.copy_(tensors[name])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # directories too: that makes their entries durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
