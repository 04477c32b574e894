"""Training methods: how a loaded base model becomes the model that is trained and saved.

Each method lives in `methods/<name>.py` and registers itself with `@register("<name>")`. `get_method`
imports that module on first use, so a method's own dependencies (bitsandbytes, ...) load only when chosen.
"""

import importlib
from collections.abc import Callable

from torch import nn
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters

MethodFn = Callable[[PreTrainedModel, ResolvedHyperparameters], nn.Module]
"""Takes the loaded base model and the job's hyperparameters; returns the model to train. Only its
trainable parameters are optimised, and its `save_pretrained` writes checkpoints and the final artifact."""

_REGISTRY: dict[str, MethodFn] = {}


def register(name: str) -> Callable[[MethodFn], MethodFn]:
    def decorator(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"training method {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorator


def get_method(name: str) -> MethodFn:
    if name not in _REGISTRY and name.isidentifier():
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    if name not in _REGISTRY:
        raise ValueError(f"unknown training method {name!r}")
    return _REGISTRY[name]
