"""LoRA: low-rank adapters on the base model's linear layers; only the adapters (and a new classifier
head, in full) train and get saved."""

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import peft_options, register


def lora_config(model: PreTrainedModel, hp: ResolvedHyperparameters, use_dora: bool = False) -> LoraConfig:
    """The adapter shape shared by lora, dora and qlora."""
    return LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,  # pyright: ignore[reportArgumentType]  # peft says int; scaling = alpha / r
        lora_dropout=hp.lora_dropout,
        target_modules=hp.lora_target_modules,
        use_dora=use_dora,
        **peft_options(model),
    )


@register("lora")
def apply_lora(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PeftModel:
    return get_peft_model(model, lora_config(model, hp))
