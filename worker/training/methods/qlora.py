"""QLoRA: the base loads in 4-bit NF4 (double-quantised constants) through bitsandbytes and stays frozen;
LoRA adapters train on top in the device dtype. The artifact is a plain LoRA adapter: it applies to the
4-bit base (what it was trained against) or, approximately, to the full-precision one.

On CPU bitsandbytes dequantises NF4 to float32 (bfloat16 and float16 work too), so the compute dtype is
simply the device's training dtype. A new classifier head stays in full precision and trains in full.
"""

from typing import Any

from bitsandbytes.nn.modules import Linear4bit
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.device import DeviceConfig, bnb_4bit_config
from worker.training.methods import new_head, register
from worker.training.methods.lora import lora_config


def load_in_4bit(device: DeviceConfig) -> dict[str, Any]:
    # Weights are quantised as they load onto their device, so name the device here, not in a later .to().
    return {"quantization_config": bnb_4bit_config(device), "device_map": {"": device.device}}


def keep_training_layout(model: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights into its CPU inference layout (AVX512-BF16 CPUs) on the
    first forward in eval mode without grad, as validation runs. That layout stays, and has no backward:
    every training step after the first validation would get silently wrong gradients. It also fails on
    layers whose width is not a multiple of 64."""
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def unquantize_new_head(model: PreTrainedModel) -> None:
    """Make the new classifier head plain linear layers again. transformers spares the model's last module
    from 4-bit conversion by its last parameter's name minus `.weight`, which misses a head with a bias
    (`classifier.bias`); a new head is initialised rather than loaded, so its weights never get quantised,
    and the 4-bit layer cannot run them."""
    for head in new_head(model):
        for name, module in list(model.get_submodule(head).named_modules(prefix=head)):
            if isinstance(module, Linear4bit) and getattr(module.weight, "quant_state", None) is None:
                linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                linear.weight, linear.bias = module.weight, module.bias
                model.set_submodule(name, linear)


@register("qlora", load_options=load_in_4bit)
def apply_qlora(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PeftModel:
    unquantize_new_head(model)
    # Upcasts the unquantised norms and embeddings to float32 for stable training, and trades compute for
    # memory with gradient checkpointing: memory is why anyone picks QLoRA. Non-reentrant checkpointing
    # needs no requires-grad hook on the frozen embeddings.
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    keep_training_layout(model)
    return get_peft_model(model, lora_config(model, hp))
