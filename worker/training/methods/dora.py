"""DoRA: LoRA whose update is split into a direction (the low-rank adapters) and a learned per-output
magnitude vector; both (and a new classifier head, in full) train and are saved as a PEFT adapter."""

from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import register
from worker.training.methods.lora import lora_config


@register("dora")
def apply_dora(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PeftModel:
    return get_peft_model(model, lora_config(model, hp, use_dora=True))
