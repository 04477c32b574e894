"""The base-model registry: which names a job may fine-tune, and where each lives on disk."""

import hashlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.orm import RegisteredModel

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


class InvalidModelName(ValueError):
    pass


GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def read_architecture(directory: Path) -> str | None:
    """The first architecture a Hugging Face directory's config.json names, if it names one."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return str(architectures[0])[:128] if isinstance(architectures, list) and architectures else None


def content_hash(directory: Path) -> str:
    """`sha256:` of a model directory's config and weights (safetensors), in name order: what an adapter
    trained on it records in its lineage, and what serving checks before putting the adapter on a base."""
    digest = hashlib.sha256()
    for path in sorted([directory / "config.json", *directory.glob("*.safetensors")]):
        digest.update(f"{path.name}\0".encode())
        with open(path, "rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return f"sha256:{digest.hexdigest()}"


def is_generative(model: RegisteredModel) -> bool | None:
    """Whether the model has a language-model head (None: its architecture is unknown)."""
    return model.architecture.endswith(GENERATIVE_SUFFIXES) if model.architecture else None


class ModelRegistry:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, name: str) -> RegisteredModel | None:
        return self.session.get(RegisteredModel, name)

    def list(self) -> Sequence[RegisteredModel]:
        return self.session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)).all()

    def register(self, name: str, path: str, source: str) -> RegisteredModel:
        """Add or update a name; names become part of `ft:{model}:…` ids, so no `:` and no spaces."""
        if not NAME_PATTERN.match(name):
            raise InvalidModelName(f"invalid model name {name!r}: use letters, digits, '.', '_', '-', '/'")
        entry = self.get(name) or RegisteredModel(name=name)
        entry.path, entry.source, entry.created_at = path, source, int(time.time())
        entry.architecture = read_architecture(Path(path))
        entry.content_hash = content_hash(Path(path))
        self.session.add(entry)
        self.session.flush()
        return entry
