"""Full fine-tuning: every parameter trains, a new classifier head with the rest; the artifact is the whole
model (safetensors, with its head and label map in config.json), loadable like any base through the auto
class of its head (`AutoModelForCausalLM`, `AutoModelForSequenceClassification`, ...)."""

from pathlib import Path

from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.methods import BaseLoader, register


def load_whole_model(load_base: BaseLoader, directory: Path) -> PreTrainedModel:
    """Serving: the artifact is the model; the base's own weights are not needed."""
    return load_base(directory)


@register("full", load=load_whole_model)
def train_everything(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PreTrainedModel:
    return model.requires_grad_(True)
