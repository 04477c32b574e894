"""Prompt tuning: `num_virtual_tokens` learned embeddings are prepended to every input; the base is frozen.
They start as embeddings of random vocabulary tokens, on the scale the model expects, rather than as N(0, 1)
noise. Saved as a PEFT adapter."""

from peft import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import register


@register("prompt_tuning")
def apply_prompt_tuning(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PeftModel:
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=hp.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
    )
    return get_peft_model(model, config)
