"""Tuning a tuned model further: how a job whose `model` is one of its organisation's fine-tuned models or
checkpoints starts from that model's weights (docs/api.md, "Tuning a tuned model").

- `continue`: the same adapter method with the same shape trains the parent's adapter further, on the same
  base; the result is again an adapter on that base.
- `merge`: a `full` job on an adapter (LoRA, DoRA, QLoRA, IA3) merges it into the base first and trains
  the merged model.
- `whole`: a `full` job on a fully fine-tuned model trains that model.

Anything else (a new adapter on a merged or fully tuned model, which serving would have to stack on a base
other than a registered one; a feature-extraction classifier) is refused with a 400.
"""

from dataclasses import dataclass
from typing import Literal

from sqlalchemy.orm import Session

from models.hyperparameters import SupervisedHyperparameters
from models.lineage import Lineage, read_lineage
from models.objectives import GENERATIVE
from models.orm import RegisteredModel
from models.spec import METHODS, Objective, ResolvedHyperparameters
from models.storage import ArtifactStore
from models.versions import ModelVersions

Start = Literal["continue", "merge", "whole"]
SHAPE_KNOBS = ("lora_r", "lora_alpha", "lora_target_modules", "num_virtual_tokens")
"""What fixes an adapter's tensors and how they apply: a continued adapter keeps the parent's."""
MERGEABLE = frozenset(name for name, traits in METHODS.items() if traits.family in ("lora", "adapter"))


@dataclass(frozen=True)
class Parent:
    """The fine-tuned model or checkpoint a job starts from."""

    model: str
    artifact_key: str
    lineage: Lineage

    @property
    def hyperparameters(self) -> ResolvedHyperparameters:
        return ResolvedHyperparameters.model_validate(self.lineage.hyperparameters)


def resolve_model(
    session: Session, store: ArtifactStore, organization_id: str, name: str
) -> tuple[RegisteredModel, Parent | None] | None:
    """A job's `model`: a registered base, or one of the organisation's fine-tuned models or checkpoints
    (with its registered base). None when it is neither, as for another organisation's model: nobody learns
    whether a name they can't use exists."""
    version = ModelVersions(session).get(organization_id, name)
    if version is None or version.base is None:
        return None
    key = version.artifact_key
    if version.kind == "base" or key is None:
        return (version.base, None) if version.kind == "base" else None
    lineage = read_lineage(store, key)
    return (version.base, Parent(name, key, lineage)) if lineage else None


def shape(training_type: str, hyperparameters: ResolvedHyperparameters) -> dict[str, object]:
    """The adapter-shape knobs this training type takes, with their values."""
    knobs = METHODS[training_type].knobs
    return {knob: getattr(hyperparameters, knob) for knob in SHAPE_KNOBS if knob in knobs}


def how_to_start(parent: ResolvedHyperparameters, child: ResolvedHyperparameters) -> Start | str:
    """How a job with the `child` hyperparameters starts from a model trained with `parent`'s, or why it
    can't (a message naming the parent's training type)."""
    before, after = parent.training_type, child.training_type
    if METHODS[before].family == "features":
        return "A feature_extraction classifier has no trained weights to tune further."
    if after == before and METHODS[after].family != "base_weights":
        theirs, ours = shape(before, parent), shape(after, child)
        if theirs != ours:
            differ = ", ".join(f"{knob}={value!r}" for knob, value in theirs.items() if ours[knob] != value)
            return (
                f"The model is a {before} adapter with {differ}; continuing it needs the same values "
                "(leave them unset to inherit them)."
            )
        return "continue"
    if after == "full" and before in MERGEABLE:
        return "merge"
    if after == "full" and before == "full":
        return "whole"
    ways = [] if METHODS[before].family == "base_weights" else [f"{before!r} (continuing it)"]
    ways += ["'full' (merged first)"] if before in MERGEABLE else ["'full'"] if before == "full" else []
    if not ways:
        return f"A {before} model can't be tuned further yet: only lora-family, ia3 and full models can."
    return f"A {before} model can be tuned further with training_type {' or '.join(ways)}, not {after!r}."


def inherit(
    requested: SupervisedHyperparameters, parent: ResolvedHyperparameters
) -> SupervisedHyperparameters:
    """The request with the parent's training type and adapter shape where it leaves them unset: tuning a
    LoRA model further continues its adapter unless told otherwise."""
    given = requested.given()
    training_type = requested.training_type if "training_type" in given else parent.training_type
    inherited: dict[str, object] = {"training_type": training_type}
    if training_type == parent.training_type:
        inherited |= {k: v for k, v in shape(training_type, parent).items() if k not in given}
    return requested.model_copy(update=inherited)


def same_kind(parent: Objective, child: Objective) -> bool:
    """Language-model objectives follow one another (SFT then DPO); a classifier goes on as one."""
    return parent == child or (parent in GENERATIVE and child in GENERATIVE)
