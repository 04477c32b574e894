"""Stored first responses of POSTs made with an `Idempotency-Key` (kept for 24 hours)."""

import time
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.orm import IdempotencyKey

RETENTION_SECONDS = 24 * 3600


class IdempotencyRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, organization_id: str, key: str) -> IdempotencyKey | None:
        cutoff = int(time.time()) - RETENTION_SECONDS
        return self.session.scalar(
            select(IdempotencyKey).where(
                IdempotencyKey.organization_id == organization_id,
                IdempotencyKey.key == key,
                IdempotencyKey.created_at > cutoff,
            )
        )

    def claim(self, organization_id: str, key: str, fingerprint: str) -> IdempotencyKey | None:
        """Insert the key in this transaction; None if another request holds it (it committed first).

        On Postgres a concurrent insert of the same key waits for the first transaction, so the loser
        sees the winner's stored response rather than a half-done request.
        """
        self.expire(organization_id, key)
        row = IdempotencyKey(
            organization_id=organization_id,
            key=key,
            fingerprint=fingerprint,
            status_code=0,
            response={},
            created_at=int(time.time()),
        )
        try:
            with self.session.begin_nested():
                self.session.add(row)
        except IntegrityError:
            return None
        return row

    def record(self, row: IdempotencyKey, status_code: int, response: dict[str, Any]) -> None:
        row.status_code, row.response = status_code, response
        self.session.flush()

    def expire(self, organization_id: str | None = None, key: str | None = None) -> int:
        """Forget keys older than the retention window (one key, or all of them); returns how many."""
        stmt = delete(IdempotencyKey).where(IdempotencyKey.created_at <= int(time.time()) - RETENTION_SECONDS)
        if key is not None:
            stmt = stmt.where(IdempotencyKey.organization_id == organization_id, IdempotencyKey.key == key)
        return self.session.execute(stmt).rowcount  # pyright: ignore[reportAttributeAccessIssue]  # a DML statement gives a CursorResult
