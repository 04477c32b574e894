"""Base models in the artifact store, so no machine needs another's path.

With the local directory store every process reads a base where it was registered (a shared models
directory, or `ftjobs models pull` on each machine). With object storage, registering a base also uploads
its directory under `models/<sha256>` (its content hash, which lineage records), and workers and inference
servers on any machine read it from their node cache. A base registered before the store was configured
has no stored copy and is still read at its registered path.
"""

from pathlib import Path

from sqlalchemy.orm import Session

from models.orm import RegisteredModel
from models.registry import ModelRegistry
from models.storage import ArtifactStore, LocalArtifactStore


def base_key(content_hash: str) -> str:
    return "models/" + content_hash.removeprefix("sha256:")


def register_base(
    session: Session, store: ArtifactStore, name: str, path: Path, source: str
) -> RegisteredModel:
    """Register a base and, with object storage, upload it before the row commits (no row names a base
    other machines cannot fetch). FileExistsError: a stored base with these weights has other files."""
    entry = ModelRegistry(session).register(name, str(path), source)
    if not isinstance(store, LocalArtifactStore):
        assert entry.content_hash is not None
        store.put_dir(base_key(entry.content_hash), path)  # a no-op when these files are stored already
    return entry


def local_base(store: ArtifactStore, path: str, content_hash: str | None) -> str:
    """A directory on this machine holding the base registered at `path` with `content_hash`."""
    if isinstance(store, LocalArtifactStore) or content_hash is None:
        return path
    cached = store.local_path(base_key(content_hash))
    return str(cached) if cached.is_dir() else path
