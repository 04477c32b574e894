"""Prefix tuning: `num_virtual_tokens` learned keys and values are prepended in every attention layer, as if
a prompt had been processed before the input; the base is frozen, a new classifier head trains in full.
Saved as a PEFT adapter.

PEFT 0.21 hands the prefix to transformers 5 as a `DynamicCache` (sized for grouped-query attention), and
Llama attends to it even with `use_cache=False`, which is how the recipe calls the model."""

import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from peft.tuners.prefix_tuning import PrefixEncoder
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import peft_options, register


@register("prefix_tuning")
def apply_prefix_tuning(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PeftModel:
    config = PrefixTuningConfig(num_virtual_tokens=hp.num_virtual_tokens, **peft_options(model))
    peft_model = get_peft_model(model, config)
    [encoder] = peft_model.prompt_encoder.values()
    assert isinstance(encoder, PrefixEncoder)
    # PEFT draws the prefix from N(0, 1), which swamps real keys and values: SmolLM2-135M's loss on plain
    # text goes from 1.15 to 10.8 before any training. Zeros start near the base (1.69) and still get
    # gradients (the prefix takes a share of the attention).
    with torch.no_grad():
        encoder.embedding.weight.zero_()
    return peft_model
