"""P-tuning: `num_virtual_tokens` prompt embeddings produced by a small MLP encoder are prepended to every
input; the base is frozen. The encoder only helps optimisation: the saved PEFT adapter holds the prompt
embeddings it produced, so loading it needs no encoder."""

from peft import PeftModel, PromptEncoderConfig, TaskType, get_peft_model
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import register


@register("p_tuning")
def apply_p_tuning(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PeftModel:
    config = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=hp.num_virtual_tokens)
    return get_peft_model(model, config)
