"""(IA)³: learned vectors that rescale the keys, values and feed-forward activations; they start at one,
train (with a new classifier head, in full), and are saved as a PEFT adapter. Which modules get them follows
PEFT's table for the architecture."""

from peft import IA3Config, PeftModel, get_peft_model
from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import peft_options, register


@register("ia3")
def apply_ia3(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PeftModel:
    return get_peft_model(model, IA3Config(**peft_options(model)))
