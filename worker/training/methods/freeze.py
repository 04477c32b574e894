"""Freeze tuning: only the last `trainable_layers` transformer blocks, the final norm and the head train;
`trainable_layers=0` trains the head and final norm alone (the "fine-tuning I" of the literature, against
"fine-tuning II" of every layer). The head is a new classifier head when the objective put one on the base
(see `new_head`), else the LM head. The artifact is just those tensors (see `_tensors`); `load_freeze`
applies it onto a fresh base.

The blocks are those `loading.find_blocks` finds; the final norm is any norm layer next to them (BERT-likes
have none: their norms sit inside the blocks). Models where the blocks are ambiguous are refused at job
start rather than guessed at. What lies outside the blocks and the head
stays frozen: the embeddings, and BERT's pooler, which is pretrained base, not head.

Tied head: SmolLM2, like many small models, ties the LM head to the input embeddings, one matrix serving
both. "The head trains" then means that matrix trains, input embeddings included: untying would add a
second vocabulary-sized matrix the base was designed without. The job log's trainable-parameter count shows
it (about 28M of SmolLM2-135M's trainable parameters are that matrix).
"""

from functools import partial
from pathlib import Path

from transformers import PreTrainedModel

from models.spec import ResolvedHyperparameters
from worker.training.loading import find_blocks
from worker.training.methods import new_head, on_fresh_base, register
from worker.training.methods._tensors import copy_into, read_trained_tensors, save_trained_tensors


def load_freeze(model: PreTrainedModel, directory: Path) -> PreTrainedModel:
    """Apply a freeze artifact onto a freshly loaded copy of its base model."""
    copy_into(model, read_trained_tensors("freeze", directory))
    return model


@register("freeze", save=partial(save_trained_tensors, "freeze"), load=on_fresh_base(load_freeze))
def freeze_all_but_last_layers(model: PreTrainedModel, hp: ResolvedHyperparameters) -> PreTrainedModel:
    parent, blocks = find_blocks(model)
    if hp.trainable_layers > len(blocks):
        raise ValueError(
            f"freeze: trainable_layers={hp.trainable_layers} but {type(model).__name__} has only "
            f"{len(blocks)} transformer blocks"
        )
    head = [model.get_submodule(name) for name in new_head(model)] or [model.get_output_embeddings()]
    if None in head:
        raise ValueError(f"freeze: {type(model).__name__} has no output head to train")
    final_norms = [child for child in parent.children() if "norm" in type(child).__name__.lower()]

    model.requires_grad_(False)
    for module in [*blocks[len(blocks) - hp.trainable_layers :], *final_norms, *head]:
        module.requires_grad_(True)
    return model
