"""BitFit: only bias terms train. Llama-family models have none (`attention_bias` and `mlp_bias` are off),
so every linear layer without a bias gets one, initialised to zero: the model computes exactly what the base
does until training moves them. Biases the architecture already has (Qwen2's q/k/v, GPT-2's) train as they
are. The LM head gets no new bias: it would only learn a fixed per-token offset to the logits, not adapt the
network.

The artifact is the biases alone (see `_tensors`); `load_bitfit` adds the same zero biases to a fresh base,
found from the saved tensor names, before applying them.
"""

from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import register
from worker.training.methods._tensors import copy_into, read_trained_tensors, save_trained_tensors


def add_zero_bias(linear: nn.Linear) -> None:
    weight = linear.weight
    linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device))


@register("bitfit", save=partial(save_trained_tensors, "bitfit"))
def train_biases(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PreTrainedModel:
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is None and module is not head:
            add_zero_bias(module)
    for name, param in model.named_parameters():
        param.requires_grad_(name.rsplit(".", 1)[-1] == "bias")
    return model


def load_bitfit(model: PreTrainedModel, directory: Path) -> PreTrainedModel:
    """Apply a bitfit artifact onto a freshly loaded copy of its base model."""
    tensors = read_trained_tensors("bitfit", directory)
    for name in tensors:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, nn.Linear) and module.bias is None:
            add_zero_bias(module)
    copy_into(model, tensors)
    return model
