"""Model versions as the API shows them, and the inference target a request's `model` resolves to."""

from sqlalchemy.orm import Session

from api.deps import on_commit
from api.registry.schemas import ArtifactFormat, Model
from models.errors import APIError, not_found
from models.inference import ModelKind, Target
from models.lineage import Lineage, read_lineage
from models.objectives import GENERATIVE
from models.registry import is_generative
from models.spec import pickle_weights
from models.storage import ArtifactStore
from models.versions import ModelVersion, ModelVersions

BASE_OWNER = "system"


def get(session: Session, org: str, model_id: str) -> ModelVersion:
    version = ModelVersions(session).get(org, model_id)
    if version is None:
        raise not_found("model", model_id, "model")
    return version


def render(version: ModelVersion, store: ArtifactStore | None = None) -> Model:
    """The API object; with a store, the lineage read from the artifact too (retrieve, not list)."""
    job = version.job
    key = version.artifact_key
    return Model(
        id=version.id,
        created=version.created,
        owned_by=job.organization_id if job else BASE_OWNER,
        kind=version.kind,
        base_model=job.model if job else None,
        fine_tuning_job=job.id if job else None,
        step=version.checkpoint.step_number if version.checkpoint else None,
        formats=formats(version),
        lineage=read_lineage(store, key) if store is not None and key else None,
    )


def formats(version: ModelVersion) -> list[ArtifactFormat]:
    if version.job is None:
        return []
    merged = version.kind == "fine-tuned" and version.job.merged_key is not None
    return ["adapter", "merged"] if merged else ["adapter"]


def delete(session: Session, store: ArtifactStore, org: str, model_id: str) -> None:
    version = get(session, org, model_id)
    if version.kind == "base":
        raise APIError(
            f"{model_id!r} is a base model; only fine-tuned models and checkpoints can be deleted.",
            status_code=403,
            param="model",
            code="permission_denied",
        )
    keys = ModelVersions(session).delete(version)

    def delete_bytes() -> None:
        for key in keys:
            store.delete(key)

    on_commit(session, delete_bytes)


def artifact_key(version: ModelVersion, fmt: ArtifactFormat) -> str:
    key = version.job.merged_key if fmt == "merged" and version.job else version.artifact_key
    if fmt not in formats(version) or key is None:
        hint = " (jobs created with export_merged: true make one)" if fmt == "merged" else ""
        raise APIError(
            f"Model {version.id!r} has no {fmt!r} artifact to download{hint}.",
            status_code=404,
            param="format",
            code="not_found",
        )
    return key


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
