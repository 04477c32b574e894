"""List envelopes in OpenAI's shape: `{object: "list", data, has_more, first_id, last_id}`."""

from collections.abc import Callable, Sequence
from typing import Annotated, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel

from models.errors import APIError

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")

After = Annotated[str | None, Query(description="Cursor: the id of the last object of the previous page.")]


def Limit(maximum: int) -> object:  # noqa: N802 (reads like a type in signatures)
    return Query(ge=1, le=maximum, description=f"Page size, 1 to {maximum}.")


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None
    last_id: str | None


def cursor(after: str | None, lookup: Callable[[str], R | None], what: str) -> R | None:
    """The object an `after` cursor names; an unknown cursor is a 400, not an empty page. An empty one
    (`?after=`, what some clients send for no cursor) is no cursor."""
    if not after:
        return None
    found = lookup(after)
    if found is None:
        raise APIError(f"No such {what} for the 'after' cursor: {after!r}", param="after")
    return found


def list_page(rows: Sequence[R], has_more: bool, render: Callable[[R], T]) -> ListPage[T]:
    data = [render(row) for row in rows]
    ids = [getattr(item, "id") for item in data]  # noqa: B009
    return ListPage[T](
        data=data, has_more=has_more, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None
    )
