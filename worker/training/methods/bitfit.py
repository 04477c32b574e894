"""BitFit: only bias terms train, plus a new classifier head in full (it starts random; the BitFit paper
trains the task head too). Llama-family models have no biases (`attention_bias` and `mlp_bias` are off), so
every linear layer without a bias gets one, initialised to zero: the model computes exactly what the base
does until training moves them. Biases the architecture already has (Qwen2's q/k/v, GPT-2's, BERT's) train
as they are. Heads get no new bias: on a pretrained LM head it would only learn a fixed per-token offset to
the logits, not adapt the network, and a new classifier head trains whole anyway.

The artifact is the biases and the new head alone (see `_tensors`); `load_bitfit` adds the same zero biases
to a fresh base, found from the saved tensor names, before applying them.
"""

from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import new_head, on_fresh_base, register
from worker.training.methods._tensors import copy_into, read_trained_tensors, save_trained_tensors


def add_zero_bias(linear: nn.Linear) -> None:
    weight = linear.weight
    linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device))


def load_bitfit(model: PreTrainedModel, directory: Path) -> PreTrainedModel:
    """Apply a bitfit artifact onto a freshly loaded copy of its base model."""
    tensors = read_trained_tensors("bitfit", directory)
    for name in tensors:
        module_name, kind = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        if kind == "bias" and isinstance(module, nn.Linear) and module.bias is None:
            add_zero_bias(module)
    copy_into(model, tensors)
    return model


@register("bitfit", save=partial(save_trained_tensors, "bitfit"), load=on_fresh_base(load_bitfit))
def train_biases(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PreTrainedModel:
    lm_head, heads = model.get_output_embeddings(), set(new_head(model))
    for name, module in model.named_modules():
        in_head = name.split(".", 1)[0] in heads
        if isinstance(module, nn.Linear) and module.bias is None and module is not lm_head and not in_head:
            add_zero_bias(module)
    for name, param in model.named_parameters():
        param.requires_grad_(name.rsplit(".", 1)[-1] == "bias" or name.split(".", 1)[0] in heads)
    return model
