"""OpenAI's Model object, with our extensions: what kind of version it is, where it came from and what can
be downloaded."""

from typing import Literal

from pydantic import BaseModel

from models.lineage import Lineage
from models.versions import Kind

ArtifactFormat = Literal["adapter", "merged"]


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Extensions.
    kind: Kind
    base_model: str | None = None
    """Fine-tuned and checkpoint versions: the base model they were trained on."""
    fine_tuning_job: str | None = None
    step: int | None = None
    """Checkpoints: the step they were taken at; fine-tuned models: the last step."""
    formats: list[ArtifactFormat] = []
    """What `GET /v1/models/{id}/content?format=…` serves."""
    lineage: Lineage | None = None
    """Retrieve only: base hash, tokenizer hash, files, method, hyperparameters, libraries, metrics."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool
