"""`Idempotency-Key` on POSTs: a retry with the same key and request gets the first response again and
creates nothing new; the same key with a different request is a 400.

The key is stored in the same transaction as what the request creates, so either both exist or neither:
a request that failed (and rolled back) can be retried with its key. Fields a response shows only once
(a webhook's signing secret) are stored as null, so a replay doesn't show them again.
"""

import hashlib
from collections.abc import Callable, Collection
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from api.deps import OrgDep, SessionDep
from models.errors import APIError
from models.idempotency import IdempotencyRepository

MAX_KEY_LENGTH = 255


class Idempotency:
    def __init__(self, session: Session, organization_id: str, key: str | None, route: str) -> None:
        self.session, self.organization_id, self.key, self.route = session, organization_id, key, route

    def run(
        self,
        request: Callable[[], bytes],
        produce: Callable[[], BaseModel],
        *,
        shown_once: Collection[str] = (),
    ) -> BaseModel | JSONResponse:
        """`produce()` once per key; `request()` identifies the request (its body, canonicalised), and is
        only computed when a key was sent. The `shown_once` fields are stored (and replayed) as null."""
        if self.key is None:
            return produce()
        fingerprint = hashlib.sha256(self.route.encode() + b"\0" + request()).hexdigest()
        repo = IdempotencyRepository(self.session)
        row = repo.claim(self.organization_id, self.key, fingerprint)
        if row is None:
            return self._replay(repo, fingerprint)
        result = produce()
        repo.record(row, 200, result.model_dump(mode="json") | dict.fromkeys(shown_once))
        return result

    def _replay(self, repo: IdempotencyRepository, fingerprint: str) -> JSONResponse:
        stored = repo.get(self.organization_id, self.key or "")
        if stored is None or stored.fingerprint != fingerprint:
            raise APIError(
                "This Idempotency-Key was already used with a different request; use a new key.",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        return JSONResponse(
            stored.response, status_code=stored.status_code, headers={"Idempotent-Replayed": "true"}
        )


def get_idempotency(
    request: Request,
    session: SessionDep,
    org: OrgDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Idempotency:
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_KEY_LENGTH:
        raise APIError(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters.", param="Idempotency-Key")
    return Idempotency(session, org, idempotency_key, f"{request.method} {request.url.path}")


IdempotencyDep = Annotated[Idempotency, Depends(get_idempotency)]
