"""LoRA: low-rank adapters on the base model's linear layers; only the adapters train and get saved."""

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import register


@register("lora")
def apply_lora(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PeftModel:
    config = LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=hp.lora_target_modules,
        task_type=TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, config)
