"""The base-model registry: which names a job may fine-tune, and where each lives on disk."""

import re
import time
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.orm import RegisteredModel

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


class InvalidModelName(ValueError):
    pass


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
        self.session.add(entry)
        self.session.flush()
        return entry
