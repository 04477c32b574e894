"""Prompt tuning: `num_virtual_tokens` learned embeddings are prepended to every input; the base is frozen,
a new classifier head trains in full. The embeddings start as embeddings of random vocabulary tokens, on the
scale the model expects, rather than as N(0, 1) noise. Saved as a PEFT adapter."""

from peft import PeftModel, PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import peft_options, register


@register("prompt_tuning")
def apply_prompt_tuning(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PeftModel:
    config = PromptTuningConfig(
        num_virtual_tokens=hp.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
        **peft_options(model),
    )
    return get_peft_model(model, config)
