"""Full fine-tuning: every parameter trains; the artifact is the whole model (safetensors), loadable with
`AutoModelForCausalLM.from_pretrained` like any base."""

from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import register


@register("full")
def train_everything(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PreTrainedModel:
    return model.requires_grad_(True)
