import re
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from api.deps import OrgDep, SessionDep, StoreDep
from api.registry import service
from api.registry.archive import stream_tar_gz
from api.registry.schemas import ArtifactFormat, Model, ModelDeleted, ModelList
from models.versions import ModelVersions

UNSAFE_IN_FILENAME = re.compile(r"[^A-Za-z0-9._-]")

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_models(session: SessionDep, org: OrgDep) -> ModelList:
    """Base models, and the organisation's fine-tuned models and checkpoints."""
    return ModelList(data=[service.render(version) for version in ModelVersions(session).list(org)])


# Before the plain `{model}` routes: model names may hold `/` (`org/name` bases), so `{model:path}` is used.
@router.get(
    "/{model:path}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/gzip": {}}, "description": "The artifact as a .tar.gz."}},
)
def download_model(
    model: str,
    session: SessionDep,
    store: StoreDep,
    org: OrgDep,
    format: Annotated[ArtifactFormat, Query(description="adapter (as trained) or merged")] = "adapter",
) -> StreamingResponse:
    """Extension: the model's artifact as a .tar.gz (safetensors weights, tokenizer, lineage.json)."""
    version = service.get(session, org, model)
    directory = store.local_path(service.artifact_key(version, format))
    root = version.id.replace(":", "_").replace("/", "_")
    # Saving records the base by the directory it was loaded from: the archive names it as registered.
    renames = {version.base.path: version.base.name} if version.base is not None else {}
    return StreamingResponse(
        stream_tar_gz(directory, root, renames),
        media_type="application/gzip",
        headers={"content-disposition": attachment(f"{root}-{format}.tar.gz")},
    )


def attachment(filename: str) -> str:
    """A Content-Disposition naming `filename` (RFC 6266): headers are Latin-1 and a quote would end the
    name, so `filename` is an ASCII stand-in and `filename*` carries the name itself, UTF-8 encoded."""
    fallback = UNSAFE_IN_FILENAME.sub("_", filename)
    if fallback == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.get("/{model:path}")
def retrieve_model(model: str, session: SessionDep, store: StoreDep, org: OrgDep) -> Model:
    """A model, with its lineage if it is fine-tuned."""
    return service.render(service.get(session, org, model), store)


@router.delete("/{model:path}")
def delete_model(model: str, session: SessionDep, store: StoreDep, org: OrgDep) -> ModelDeleted:
    """Delete a fine-tuned model or checkpoint and its artifact; its job keeps the name it published."""
    service.delete(session, store, org, model)
    return ModelDeleted(id=model, deleted=True)
