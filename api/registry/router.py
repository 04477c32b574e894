from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from api.deps import OrgDep, SessionDep, StoreDep
from api.registry import service
from api.registry.archive import stream_tar_gz
from api.registry.schemas import ArtifactFormat, Model, ModelDeleted, ModelList
from models.versions import ModelVersions

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
    return StreamingResponse(
        stream_tar_gz(directory, root),
        media_type="application/gzip",
        headers={"content-disposition": f'attachment; filename="{root}-{format}.tar.gz"'},
    )


@router.get("/{model:path}")
def retrieve_model(model: str, session: SessionDep, store: StoreDep, org: OrgDep) -> Model:
    """A model, with its lineage if it is fine-tuned."""
    return service.render(service.get(session, org, model), store)


@router.delete("/{model:path}")
def delete_model(model: str, session: SessionDep, store: StoreDep, org: OrgDep) -> ModelDeleted:
    """Delete a fine-tuned model or checkpoint and its artifact; its job keeps the name it published."""
    service.delete(session, store, org, model)
    return ModelDeleted(id=model, deleted=True)
