"""Method registry, the LoRA method and device selection."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from models.spec import ResolvedHyperparameters
from tests.tiny_model import build_tiny_llama
from worker.training.device import bnb_4bit_config, select_device
from worker.training.methods import get_method, register
from worker.training.methods.lora import apply_lora


def hyperparameters(target_modules: list[str] | str) -> ResolvedHyperparameters:
    return ResolvedHyperparameters(
        n_epochs=1,
        batch_size=1,
        learning_rate_multiplier=1.0,
        learning_rate=1e-3,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules=target_modules,
        max_seq_length=32,
        warmup_ratio=0.0,
    )


def test_registry_resolves_lora_and_rejects_unknown_names() -> None:
    assert get_method("lora") is apply_lora
    for name in ("no_such_method", "../lora", ""):
        with pytest.raises(ValueError, match="unknown training method"):
            get_method(name)
    with pytest.raises(ValueError, match="registered twice"):
        register("lora")(apply_lora)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
    ],
)
def test_lora_trains_only_adapters_on_the_target_modules(
    tmp_path: Path, targets: list[str] | str, expected: set[str]
) -> None:
    base = AutoModelForCausalLM.from_pretrained(build_tiny_llama(tmp_path / "base"))
    model = get_method("lora")(base, hyperparameters(targets))

    assert isinstance(model, PeftModel)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == expected
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.task_type) == (4, 8, "CAUSAL_LM")


def test_cpu_trains_in_float32_and_4bit_config_follows_the_device() -> None:
    device = select_device()
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectation")
    assert (device.device.type, device.dtype, device.needs_grad_scaling) == ("cpu", torch.float32, False)
    config = bnb_4bit_config(device)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32
