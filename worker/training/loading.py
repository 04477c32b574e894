"""Loading a base model and its tokenizer from a registered directory: offline, safetensors only, never
remote code."""

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from models.spec import pickle_weights
from worker.training.device import DeviceConfig


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if tokenizer.pad_token is None:
        # Padding is masked by position (attention mask, -100 labels), so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str, device: DeviceConfig, auto_class: Any = AutoModelForCausalLM, **options: Any
) -> PreTrainedModel:
    """The base model on the device through `auto_class` (a causal LM unless an objective needs a head of
    its own); `options` are extra `from_pretrained` arguments (a method's, an objective's)."""
    model = auto_class.from_pretrained(
        path,
        dtype=device.dtype,
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
        **options,
    )
    return model.to(device.device)


def refuse_pickle_weights(directory: Path) -> None:
    """Raise unless an artifact directory holds no pickle weights: peft loads `adapter_model.bin` with
    `torch.load` when `adapter_model.safetensors` is missing."""
    if pickles := pickle_weights(directory):
        raise ValueError(f"{directory} holds pickle weights ({', '.join(pickles)}); only safetensors load")


def count_parameters(parameters: Iterable[nn.Parameter]) -> int:
    # A 4-bit weight stores two values per byte; count its values (its original shape), like any weight's.
    return sum(
        quant.shape.numel() if (quant := getattr(p, "quant_state", None)) else p.numel() for p in parameters
    )


def find_blocks(model: PreTrainedModel) -> tuple[nn.Module, nn.ModuleList]:
    """The module holding the transformer blocks, and the blocks: the one `nn.ModuleList` with as many
    entries as the config has hidden layers (`model.layers` in Llama-likes, `transformer.h` in GPT-2-likes,
    `encoder.layer` in BERT-likes). A ValueError when that is not exactly one list."""
    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    found = [
        (parent, child)
        for parent in model.modules()
        for child in parent.children()
        if isinstance(child, nn.ModuleList) and len(child) == n_layers
    ]
    if len(found) != 1:
        raise ValueError(
            f"cannot tell which modules of {type(model).__name__} are its transformer blocks; "
            "use another training_type for this model"
        )
    return found[0]
