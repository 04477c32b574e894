"""Artifacts for methods that train some of the base model's own tensors (freeze, bitfit): only those
tensors, as safetensors, plus a small JSON naming the method, the base and the tensors. They stay small
and apply onto any fresh copy of the base."""

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "trained_tensors.safetensors"
CONFIG_FILE = "trained_tensors.json"


def save_trained_tensors(
    method: str, model: nn.Module, directory: Path, state: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Write every parameter that trains (a tied one once, under its first name) and the JSON beside it;
    from `state` when given (a sharded model's whole state)."""
    tensors = {
        name: (p if state is None else state[name]).detach().cpu().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    config = {
        "training_type": method,
        "base_model_name_or_path": getattr(model, "name_or_path", None),
        "tensors": sorted(tensors),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_trained_tensors(method: str, directory: Path) -> dict[str, torch.Tensor]:
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    if config["training_type"] != method:
        raise ValueError(f"{directory} holds a {config['training_type']} artifact, not {method}")
    tensors = load_file(directory / WEIGHTS_FILE)
    if sorted(tensors) != config["tensors"]:
        raise ValueError(f"{directory / WEIGHTS_FILE} does not hold the tensors {CONFIG_FILE} lists")
    return tensors


@torch.no_grad()
def copy_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite the named parameters in place (so a tied matrix stays tied); every name must exist."""
    for name, tensor in tensors.items():
        model.get_parameter(name).copy_(tensor)
