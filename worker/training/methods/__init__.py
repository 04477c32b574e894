"""Training methods: how a base model is loaded, made trainable and saved.

A method is one row of `models.spec.METHODS` (its traits: family, objectives, base learning rate, knobs,
how it is served) and one module, `methods/<name>.py`, that registers its `prepare` function with
`@register("<name>")`, naming any loading or saving it does differently, and how serving rebuilds the model
from its artifact (`load`). A name without a row, or registered twice, is refused when its module is
imported. `get_method` imports that module on first use, so a method's own dependencies (bitsandbytes, ...)
load only when chosen.

The base arrives with its objective's head: a pretrained LM head (causal LM objectives) or a new, randomly
initialised classifier head (classification, token classification, reward). `task_type` and `new_head` are
the one place that tells them apart; every method trains a new head in full, since nothing else would.
"""

import importlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel, TaskType, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)

from models.spec import METHODS, ResolvedHyperparameters
from worker.training.device import DeviceConfig
from worker.training.loading import refuse_pickle_weights

StateDict = Mapping[str, torch.Tensor]
PrepareFn = Callable[[PreTrainedModel, ResolvedHyperparameters], nn.Module]
"""Takes the loaded base model and the job's hyperparameters; returns the model to train. Only its
parameters with `requires_grad` are optimised."""


class SaveFn(Protocol):
    def __call__(self, model: nn.Module, directory: Path, state: StateDict | None = None) -> None:
        """Writes a checkpoint or the final artifact of the prepared model into a directory (safetensors
        only); `state`, when given, is the model's whole state by parameter name (a model sharded over
        several ranks holds only its shards)."""
        ...


LoadOptionsFn = Callable[[DeviceConfig], dict[str, Any]]
"""Extra `from_pretrained` arguments for the base model on the given device."""


class BaseLoader(Protocol):
    def __call__(self, path: Path | None = None) -> PreTrainedModel:
        """A fresh copy of the base (with the head and on the device serving wants); given a path, that
        model directory loaded the same way (a fully fine-tuned model is a whole model of its kind)."""
        ...


LoadFn = Callable[[BaseLoader, Path], nn.Module]
"""Serving: the ready model of an artifact directory, built from the loader. Called only for a dedicated
model, so it may change the base it loads."""


def task_type(model: PreTrainedModel) -> TaskType:
    """The kind of head the model has, as PEFT names it: PEFT wraps each kind in its own model class."""
    name = type(model).__name__
    if name in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        return TaskType.SEQ_CLS
    if name in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values():
        return TaskType.TOKEN_CLS
    return TaskType.CAUSAL_LM


def new_head(model: PreTrainedModel) -> list[str]:
    """Names of the top-level modules a classifier head adds beside its pretrained base (BERT's `classifier`,
    Llama's `score`, DistilBERT's `pre_classifier` and `classifier`). They start random, so they must train
    and be saved; a causal LM's head is pretrained and is not new."""
    if task_type(model) == TaskType.CAUSAL_LM:
        return []
    return [
        name
        for name, child in model.named_children()
        if child is not model.base_model and next(child.parameters(), None) is not None
    ]


_CONTINUED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
"""Prepared models that start from a tuned adapter (`continue_adapter`): their start is that adapter."""


def continue_adapter(model: nn.Module, directory: Path) -> None:
    """Load a tuned model's adapter (same method, same shape) into a freshly prepared model, so training
    continues it (models/continuation.py)."""
    refuse_pickle_weights(directory)
    if not isinstance(model, PeftModel):
        raise TypeError(f"a {type(model).__name__} has no adapter to continue")
    weights = load_file(directory / "adapter_model.safetensors", device=str(next(model.parameters()).device))
    loaded = set_peft_model_state_dict(model, weights)
    if loaded.unexpected_keys:
        raise ValueError(f"the adapter in {directory} does not fit: {loaded.unexpected_keys[:3]}")
    _CONTINUED.add(model)


def merged_into(base: PreTrainedModel, directory: Path) -> PreTrainedModel:
    """The base with a tuned model's adapter merged into its weights (a `full` job on an adapter)."""
    refuse_pickle_weights(directory)
    return PeftModel.from_pretrained(base, directory).merge_and_unload()


@contextmanager
def untouched(model: nn.Module) -> Iterator[nn.Module]:
    """The model as it was before any step: a learned prompt's model without its prompt, an adapter's with
    the adapter switched off, a continued adapter's as loaded (called before the first step); every other
    method starts as the base itself. (PEFT's `disable_adapter` cannot serve prompt learning on classifier
    models: it looks for a generation hook they do not have.)"""
    if model in _CONTINUED:
        yield model
    elif isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        yield model.get_base_model()
    elif isinstance(model, PeftModel):
        with model.disable_adapter():
            yield model
    else:
        yield model


def peft_options(model: PreTrainedModel) -> dict[str, Any]:
    """The PEFT config fields every PEFT method takes from the model: its task type, and its new head as
    `modules_to_save` (trained in full beside the adapter and saved in it)."""
    return {"task_type": task_type(model), "modules_to_save": new_head(model) or None}


def save_pretrained(model: nn.Module, directory: Path, state: StateDict | None = None) -> None:
    """PEFT adapters and whole transformers models both know how to save themselves as safetensors."""
    if not isinstance(model, PeftModel | PreTrainedModel):
        raise TypeError(f"a {type(model).__name__} cannot save itself: its method must register a save")
    model.save_pretrained(str(directory), state_dict=None if state is None else dict(state))


def no_load_options(device: DeviceConfig) -> dict[str, Any]:
    return {}


def load_peft(load_base: BaseLoader, directory: Path) -> nn.Module:
    """PEFT adapters (every PEFT method) restore themselves onto a fresh base."""
    refuse_pickle_weights(directory)
    return PeftModel.from_pretrained(load_base(), directory)


def on_fresh_base(apply: Callable[[PreTrainedModel, Path], nn.Module]) -> LoadFn:
    """A load hook from a function that applies an artifact onto a freshly loaded base (freeze, bitfit)."""

    def load(load_base: BaseLoader, directory: Path) -> nn.Module:
        return apply(load_base(), directory)

    return load


@dataclass(frozen=True)
class Method:
    name: str
    prepare: PrepareFn
    save: SaveFn
    load_options: LoadOptionsFn
    load: LoadFn = load_peft


_REGISTRY: dict[str, Method] = {}


def register(
    name: str,
    *,
    save: SaveFn = save_pretrained,
    load_options: LoadOptionsFn = no_load_options,
    load: LoadFn = load_peft,
) -> Callable[[PrepareFn], PrepareFn]:
    if name not in METHODS:
        raise ValueError(f"training method {name!r} has no row in models.spec.METHODS")

    def decorator(prepare: PrepareFn) -> PrepareFn:
        if name in _REGISTRY:
            raise ValueError(f"training method {name!r} is registered twice")
        _REGISTRY[name] = Method(name, prepare, save, load_options, load)
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
