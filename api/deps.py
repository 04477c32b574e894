"""Request dependencies: one database session per request, committed before the response is sent; who is
calling (`api.auth`)."""

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.auth import admin, organization_id
from models.auth import Principal
from models.db import session_scope
from models.queue import Dispatcher
from models.settings import Settings
from models.storage import ArtifactStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


def on_commit(session: Session, action: Callable[[], None]) -> None:
    """Run `action` only once this request's transaction has committed (wake-ups, deleting bytes)."""
    session.info.setdefault("on_commit", []).append(action)


def get_session(request: Request) -> Iterator[Session]:
    """Commit at the edge, then run the request's on-commit actions; a rollback discards them."""
    with session_scope(request.app.state.session_factory) as session:
        yield session
    for action in session.info.get("on_commit", []):
        action()


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
# scope="function": the commit runs before the response is sent, so a 200 means the job is stored.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
OrgDep = Annotated[str, Depends(organization_id)]
"""The calling key's organisation: every object a route touches is looked up within it."""
AdminDep = Annotated[Principal, Depends(admin)]
