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
    trainer/sharded/                 instead of the two files above, for the methods that shard a whole
                                     model over several ranks (`parallel="fsdp"`: full, freeze): the
                                     trained parameters ("model.{name}") and their optimizer state
                                     ("optim.{name}.{state}"), written by every rank at once through
                                     torch.distributed.checkpoint's safetensors writer (one file per
                                     rank, each holding that rank's shards) and read back resharded onto
                                     any number of ranks, one included. Such jobs write this format on
                                     one rank too, so every checkpoint of theirs resumes on any world size.
    trainer/rng.safetensors          the torch CPU (and CUDA) generator states (rank 0's)
    trainer/state.json               progress, the job fingerprint, optimizer param groups, scheduler,
                                     grad scaler and python RNG states
    COMPLETE                         written last, after every rank has written; a directory without it
                                     is never resumed from

No pickle anywhere: tensors go to safetensors, everything else to JSON (torch.distributed.checkpoint's
default writer pickles its metadata: its safetensors writer does not).
"""

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from models.spec import METHODS, Metrics, TrainingSpec
from worker.training import distributed
from worker.training.methods import Method

FORMAT = 1
COMPLETE = "COMPLETE"
TRAINER_DIR = "trainer"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
SHARDED_DIR = "sharded"
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


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
    fingerprint = {
        **spec.hyperparameters.model_dump(mode="json"),
        "seed": spec.seed,
        "n_train_examples": n_train_examples,
        "n_valid_examples": n_valid_examples,
        "training_file_sha256": training_sha256,
    }
    if writes_sharded(spec.hyperparameters.training_type):
        # torch.distributed.checkpoint promises no compatibility across torch versions.
        fingerprint["torch"] = torch.__version__
    return fingerprint


def writes_sharded(training_type: str) -> bool:
    """Whether this method's checkpoints hold their trainer state in `trainer/sharded/`."""
    return METHODS[training_type].parallel == "fsdp"


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
    extras: Callable[[Path], None],
) -> None:
    """Write into a hidden sibling, make it durable, rename it to `directory`, then mark it complete.

    Every rank calls it: rank 0 writes the method's artifact, `extras(directory)` (the tokenizer, the
    objective's files) and the trainer state, the other ranks their shards of a sharded state (or nothing);
    `COMPLETE` comes after every rank has written."""
    partial = directory.with_name(f".{directory.name}.partial")
    trainer_dir = partial / TRAINER_DIR
    if distributed.is_main():
        shutil.rmtree(partial, ignore_errors=True)  # left behind by an attempt that died mid-write
        trainer_dir.mkdir(parents=True)
    distributed.barrier()
    if writes_sharded(method.name):
        param_groups = _save_sharded(trainer_dir / SHARDED_DIR, model, optimizer)
    else:  # the replicas are identical: rank 0's is the state
        param_groups = _save_whole(trainer_dir, model, optimizer) if distributed.is_main() else []
    whole = distributed.whole_state(model)
    if distributed.is_main():
        method.save(model, partial, whole)
    distributed.barrier()  # every rank's shards are written
    if not distributed.is_main():
        distributed.barrier()
        return

    extras(partial)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # the recipe trains on one device: the current one
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, trainer_dir / RNG_FILE)
    state = {
        "format": FORMAT,
        "job": fingerprint,
        "progress": asdict(progress),
        "optimizer_param_groups": param_groups,
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
    distributed.barrier()  # no rank runs ahead of a checkpoint that is not complete yet


def _save_whole(trainer_dir: Path, model: nn.Module, optimizer: Optimizer) -> list[dict[str, Any]]:
    """Rank 0's copy of the trained tensors and their optimizer state; returns the param groups."""
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
    return optimizer_state["param_groups"]


def _save_sharded(directory: Path, model: nn.Module, optimizer: Optimizer) -> list[dict[str, Any]]:
    """Every rank's shards of the trained tensors and their optimizer state, keyed by parameter name (so
    they load onto any world size); returns the param groups, which name their parameters."""
    distributed.reshard(model)
    # By parameter name: {"state": {name: {"step": ..., "exp_avg": ...}}, "param_groups": [...]}.
    optimizer_state = cast(dict[str, Any], get_optimizer_state_dict(model, optimizer))
    per_parameter: dict[str, dict[str, torch.Tensor]] = optimizer_state["state"]
    tensors = {f"model.{name}": p.detach() for name, p in model.named_parameters() if p.requires_grad}
    for name, values in per_parameter.items():
        tensors |= {f"optim.{name}.{key}": value for key, value in values.items()}
    writer = HuggingFaceStorageWriter(str(directory), save_distributed=True)  # a file per rank
    state_dict_saver.save(tensors, storage_writer=writer)
    return optimizer_state["param_groups"]


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
    if (trainer_dir / SHARDED_DIR).is_dir():
        _load_sharded(trainer_dir / SHARDED_DIR, model, optimizer, state["optimizer_param_groups"])
    else:
        _load_whole(trainer_dir, model, optimizer, state["optimizer_param_groups"])
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
    """Put a checkpoint's trained parameters (and nothing else of its state) into the model. Every rank
    calls it: a sharded checkpoint is read collectively."""
    trainer_dir = directory / TRAINER_DIR
    if (trainer_dir / SHARDED_DIR).is_dir():
        _load_sharded(trainer_dir / SHARDED_DIR, model)
    else:
        _copy_trainable(model, load_file(trainer_dir / TRAINABLE_FILE))


def _load_whole(
    trainer_dir: Path, model: nn.Module, optimizer: Optimizer, param_groups: list[dict[str, Any]]
) -> None:
    _copy_trainable(model, load_file(trainer_dir / TRAINABLE_FILE))
    per_parameter: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(trainer_dir / OPTIMIZER_FILE).items():
        index, name = key.split(".", 1)
        per_parameter.setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict({"state": per_parameter, "param_groups": param_groups})


def _load_sharded(
    directory: Path,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    param_groups: list[dict[str, Any]] | None = None,
) -> None:
    """Read a sharded trainer state (without an optimizer: the weights alone) into this rank's shards
    (whatever the world size that wrote it): torch.distributed.checkpoint fills tensors shaped and sharded
    like this run's, in place."""
    distributed.reshard(model)
    reader = HuggingFaceStorageReader(str(directory))
    saved = set(reader.read_metadata().state_dict_metadata)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tensors: dict[str, torch.Tensor] = {f"model.{name}": p.detach() for name, p in trained.items()}
    # AdamW's state: a scalar step and two moments shaped (and sharded) like the parameter; none for a
    # parameter that never had a gradient.
    with_state = [name for name in trained if optimizer is not None and f"optim.{name}.step" in saved]
    for name in with_state:
        tensors[f"optim.{name}.step"] = torch.zeros((), dtype=torch.float32)
        for key in ADAM_STATE[1:]:
            tensors[f"optim.{name}.{key}"] = torch.zeros_like(trained[name].detach())
    state_dict_loader.load(tensors, storage_reader=reader)
    if optimizer is None or param_groups is None:
        return
    per_parameter = {name: {key: tensors[f"optim.{name}.{key}"] for key in ADAM_STATE} for name in with_state}
    set_optimizer_state_dict(model, optimizer, {"state": per_parameter, "param_groups": param_groups})  # pyright: ignore[reportArgumentType]


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
