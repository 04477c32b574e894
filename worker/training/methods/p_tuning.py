"""P-tuning: `num_virtual_tokens` prompt embeddings produced by a small MLP encoder are prepended to every
input; the base is frozen, a new classifier head trains in full. The encoder only helps optimisation: the
saved PEFT adapter holds the prompt embeddings it produced, so loading it needs no encoder."""

from peft import PeftModel, PromptEncoderConfig, get_peft_model
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import peft_options, register


@register("p_tuning")
def apply_p_tuning(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PeftModel:
    config = PromptEncoderConfig(num_virtual_tokens=hp.num_virtual_tokens, **peft_options(model))
    return get_peft_model(model, config)
