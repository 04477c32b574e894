"""Cursor pagination over `seq`, shared by every list endpoint (files, jobs, events, checkpoints)."""

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

T = TypeVar("T")


def page(
    session: Session,
    stmt: Select[T],
    seq: InstrumentedAttribute[Any],
    *,
    after_seq: int | None,
    limit: int,
    descending: bool = True,
) -> tuple[Sequence[T], bool]:
    """Return up to `limit` rows after the cursor in `seq` order, and whether more follow."""
    if after_seq is not None:
        stmt = stmt.where(seq < after_seq if descending else seq > after_seq)
    stmt = stmt.order_by(seq.desc() if descending else seq.asc()).limit(limit + 1)
    rows = session.scalars(stmt).all()
    return rows[:limit], len(rows) > limit
