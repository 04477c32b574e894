"""What the inference server loads for a model of the registry: the API resolves a request's model into a
`Target`, and a grader's judge models (checked by the graders API and at job create, resolved again by the
worker for a reinforcement job's trainer)."""

from sqlalchemy.orm import Session

from graders.grading import model_graders
from graders.shapes import AnyGrader
from models.errors import APIError
from models.inference import ModelKind, Target
from models.lineage import Lineage, read_lineage
from models.objectives import GENERATIVE
from models.registry import is_generative
from models.spec import pickle_weights
from models.storage import ArtifactStore
from models.versions import ModelVersion, ModelVersions


def target(store: ArtifactStore, version: ModelVersion) -> Target:
    """What the inference server loads for a request naming this version."""
    if version.base is None:
        message = f"The base model of {version.id!r} is no longer registered."
        raise APIError(message, param="model", code="model_not_found")
    key = version.artifact_key
    if key is None:
        return Target(
            model=version.id,
            base_path=version.base.path,
            base_content_hash=version.base.content_hash,
            kind=_base_kind(version),
        )
    # Never hand the inference server pickle weights: peft would load an `adapter_model.bin` with torch.load.
    if pickles := pickle_weights(store.local_path(key)):
        raise APIError(
            f"Model {version.id!r} holds pickle weights ({', '.join(pickles)}), which are never loaded.",
            param="model",
            code="model_not_supported",
        )
    lineage = read_lineage(store, key)
    if lineage is None:
        raise APIError(
            f"Model {version.id!r} was published without lineage and cannot be served.",
            param="model",
            code="model_not_supported",
        )
    return Target(
        model=version.id,
        base_path=version.base.path,
        base_content_hash=version.base.content_hash,
        artifact_key=key,
        method=lineage.training_type,
        kind=_tuned_kind(version.id, lineage),
    )


def _base_kind(version: ModelVersion) -> ModelKind:
    assert version.base is not None
    if is_generative(version.base) is False:
        raise APIError(
            f"{version.id!r} is an encoder without a language-model head: fine-tune a classifier on it, then "
            "use /v1/classifications with that model.",
            param="model",
            code="model_not_supported",
        )
    return "causal_lm"


def _tuned_kind(model_id: str, lineage: Lineage) -> ModelKind:
    if lineage.objective in GENERATIVE:
        return "causal_lm"
    if lineage.objective == "classification":
        return "classification"
    raise APIError(
        f"Model {model_id!r} is a {lineage.objective} model; serving covers language models and text "
        "classifiers.",
        param="model",
        code="model_not_supported",
    )


def judge_targets(
    session: Session, store: ArtifactStore, org: str, grader: AnyGrader, param: str
) -> dict[str, Target]:
    """Each judge model of `grader` (by name) as the inference server loads it for `org`; a 400 naming the
    judge's field for one that does not exist or is another organisation's (the same answer), or that
    cannot answer a chat completion."""
    targets: dict[str, Target] = {}
    for where, judge in model_graders(grader, param):
        version = ModelVersions(session).get(org, judge.model)
        if version is None:
            raise APIError(
                f"The judge model {judge.model!r} does not exist or you do not have access to it.",
                param=f"{where}.model",
                code="model_not_found",
            )
        try:
            found = target(store, version)
        except APIError as error:  # an encoder base, pickle weights, a base unregistered since
            raise APIError(error.message, param=f"{where}.model", code=error.code) from error
        if found.kind != "causal_lm":
            raise APIError(
                f"The judge model {judge.model!r} is a classifier: a judge answers in chat.",
                param=f"{where}.model",
                code="model_not_supported",
            )
        targets[judge.model] = found
    return targets
