"""Training methods: how a base model is loaded, made trainable and saved.

Each method lives in `methods/<name>.py` and registers its `prepare` function with `@register("<name>")`,
naming any loading or saving it does differently. `get_method` imports that module on first use, so a
method's own dependencies (bitsandbytes, ...) load only when chosen.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.device import DeviceConfig

PrepareFn = Callable[[PreTrainedModel, ResolvedHyperparameters], nn.Module]
"""Takes the loaded base model and the job's hyperparameters; returns the model to train. Only its
parameters with `requires_grad` are optimised."""
SaveFn = Callable[[nn.Module, Path], None]
"""Writes a checkpoint or the final artifact of the prepared model into a directory (safetensors only)."""
LoadOptionsFn = Callable[[DeviceConfig], dict[str, Any]]
"""Extra `from_pretrained` arguments for the base model on the given device."""


def save_pretrained(model: nn.Module, directory: Path) -> None:
    """PEFT adapters and whole transformers models both know how to save themselves as safetensors."""
    model.save_pretrained(directory)


def no_load_options(device: DeviceConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Method:
    name: str
    prepare: PrepareFn
    save: SaveFn
    load_options: LoadOptionsFn


_REGISTRY: dict[str, Method] = {}


def register(
    name: str, *, save: SaveFn = save_pretrained, load_options: LoadOptionsFn = no_load_options
) -> Callable[[PrepareFn], PrepareFn]:
    def decorator(prepare: PrepareFn) -> PrepareFn:
        if name in _REGISTRY:
            raise ValueError(f"training method {name!r} is registered twice")
        _REGISTRY[name] = Method(name, prepare, save, load_options)
        return prepare

    return decorator


def get_method(name: str) -> Method:
    if name not in _REGISTRY and name.isidentifier():
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    if name not in _REGISTRY:
        raise ValueError(f"unknown training method {name!r}")
    return _REGISTRY[name]
