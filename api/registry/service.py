"""Model versions as the API shows them, and the inference target a request's `model` resolves to."""

from sqlalchemy.orm import Session

from api.deps import on_commit
from api.registry.schemas import ArtifactFormat, Model
from models.errors import APIError, not_found
from models.lineage import read_lineage
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
