"""Lineage: where a model version came from. Written as `lineage.json` into every published artifact (the
final adapter and each checkpoint), so an artifact describes itself wherever it is copied, and kept on the
job for the models API.

Serving reads `base_model.content_hash` and refuses to put the artifact on a base whose hash differs."""

import hashlib
import json
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy.orm import Session

from models.files import FileRepository
from models.orm import Job
from models.registry import ModelRegistry, content_hash
from models.spec import Metrics, Objective
from models.storage import ArtifactStore
from models.versions import root_base

LINEAGE_FILE = "lineage.json"
RENAMED_IN = {".json", ".md"}
"""Where saving records the base model's directory: peft's adapter_config.json and model card (README.md),
our own methods' JSON."""


class BaseModelRef(BaseModel):
    name: str
    content_hash: str
    """`models.registry.content_hash` of the base's directory when the job ran."""


class FileRef(BaseModel):
    id: str
    sha256: str


class Lineage(BaseModel):
    job_id: str
    base_model: BaseModelRef
    tokenizer_hash: str
    """sha256 over the artifact's tokenizer files, chat template included: what inference renders with."""
    training_file: FileRef
    validation_file: FileRef | None
    method: dict[str, object]
    """The job's method as requested."""
    objective: Objective
    training_type: str
    hyperparameters: dict[str, object]
    """As resolved when the job started."""
    libraries: dict[str, str]
    step: int
    metrics: Metrics
    parent_model: str | None = None
    """The fine-tuned model or checkpoint the job started from (its `model`); None when that was a base."""
    parent: "Lineage | None" = None
    """That model's own lineage, so the whole chain back to the base is here (docs/models.md)."""


LIBRARIES = ("ftjobs", "torch", "transformers", "peft", "bitsandbytes", "trl", "safetensors")
_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template", "vocab", "merges")


def tokenizer_hash(directory: Path) -> str:
    """sha256 over the tokenizer files an artifact carries (`tokenizer.save_pretrained`'s), in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name.startswith(_TOKENIZER_FILES)):
        digest.update(f"{path.name}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return f"sha256:{digest.hexdigest()}"


def library_versions() -> dict[str, str]:
    """Installed versions, read from package metadata: the job runner never imports torch."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_lineage(
    session: Session,
    job: Job,
    objective: Objective,
    step: int,
    metrics: Metrics,
    directory: Path,
    parent: Lineage | None = None,
) -> Lineage:
    """Compose the lineage of the artifact in `directory` from the job's records (and the lineage of the
    tuned model it started from) and write it there."""
    model = ModelRegistry(session).get(root_base(job.model))
    assert model is not None and job.hyperparameters is not None
    if model.content_hash is None:  # registered before hashes were kept
        model.content_hash = content_hash(Path(model.path))
    files = FileRepository(session)

    def file_ref(file_id: str | None) -> FileRef | None:
        record = files.get(job.organization_id, file_id) if file_id else None
        return FileRef(id=record.id, sha256=record.sha256) if record else None

    training_file = file_ref(job.training_file)
    assert training_file is not None
    lineage = Lineage(
        job_id=job.id,
        base_model=BaseModelRef(name=model.name, content_hash=model.content_hash),
        tokenizer_hash=tokenizer_hash(directory),
        training_file=training_file,
        validation_file=file_ref(job.validation_file),
        method=job.method,
        objective=objective,
        training_type=job.hyperparameters.training_type,
        hyperparameters=job.hyperparameters.model_dump(mode="json"),
        libraries=library_versions(),
        step=step,
        metrics=metrics,
        parent_model=job.model if parent else None,
        parent=parent,
    )
    (directory / LINEAGE_FILE).write_text(lineage.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return lineage


def renamed_metadata(path: Path, renames: dict[str, str]) -> bytes | None:
    """A text metadata file with each of `renames`' strings replaced; None when nothing changes."""
    if path.suffix not in RENAMED_IN:
        return None
    text = original = path.read_text(encoding="utf-8", errors="surrogateescape")
    for old, new in renames.items():
        if path.suffix == ".json":  # as JSON spells the strings inside its quotes
            old, new = json.dumps(old)[1:-1], json.dumps(new)[1:-1]
        text = text.replace(old, new)
    return None if text == original else text.encode("utf-8", errors="surrogateescape")


def read_lineage(store: ArtifactStore, artifact_key: str) -> Lineage | None:
    """The lineage stored with an artifact (None for one published before lineage was kept)."""
    try:
        with store.open(f"{artifact_key}/{LINEAGE_FILE}") as file:
            return Lineage.model_validate_json(file.read())
    except FileNotFoundError:
        return None
