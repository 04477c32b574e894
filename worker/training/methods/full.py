"""Full fine-tuning: every parameter trains, a new classifier head with the rest; the artifact is the whole
model (safetensors, with its head and label map in config.json), loadable like any base through the auto
class of its head (`AutoModelForCausalLM`, `AutoModelForSequenceClassification`, ...)."""

from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import register


@register("full")
def train_everything(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PreTrainedModel:
    return model.requires_grad_(True)
