"""Organisations and API keys: who may call the API, and whose objects a key sees.

A key is `sk-ftj-{id}-{secret}` (an admin key `sk-ftjadmin-{id}-{secret}`): the id finds its row, the 256-bit
secret is the entropy. Only sha256 of the whole key is stored (fast hashing is enough for a random secret)
and compared in constant time; the key itself is shown once, when it is made. The `sk-ftj` prefix lets
secret scanners recognise a leaked key.
"""

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.ids import random_id
from models.orm import ApiKey, Organization

KEY_PREFIX = "sk-ftj-"
ADMIN_KEY_PREFIX = "sk-ftjadmin-"
ORGANIZATION_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
"""Lowercase, so names can't collide by case; no `:`, the separator of fine-tuned model names."""
LAST_USED_RESOLUTION = 60
"""Seconds: `last_used_at` is written at most this often per key, not on every request."""


class InvalidName(ValueError):
    pass


@dataclass(frozen=True)
class Principal:
    """Who a request is from."""

    key_id: str
    organization_id: str | None
    """None for an admin key."""

    @property
    def is_admin(self) -> bool:
        return self.organization_id is None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _parse(key: str) -> str | None:
    """The id a well-formed key carries."""
    for prefix in (ADMIN_KEY_PREFIX, KEY_PREFIX):
        if key.startswith(prefix):
            key_id, _, secret = key.removeprefix(prefix).partition("-")
            return key_id if key_id and secret else None
    return None


class Organizations:
    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, name: str) -> Organization:
        if not ORGANIZATION_NAME.match(name):
            raise InvalidName(
                f"Invalid organization name {name!r}: 1 to 64 characters of a-z, 0-9, '-' and '_', starting "
                "with a letter or digit."
            )
        if self.by_name(name) is not None:
            raise InvalidName(f"An organization named {name!r} already exists.")
        organization = Organization(id=random_id("org-"), name=name, created_at=int(time.time()))
        self.session.add(organization)
        self.session.flush()
        return organization

    def named(self, name: str) -> Organization:
        """The organisation called `name`, created if new."""
        return self.by_name(name) or self.create(name)

    def get(self, organization_id: str) -> Organization | None:
        return self.session.get(Organization, organization_id)

    def by_name(self, name: str) -> Organization | None:
        return self.session.scalars(select(Organization).where(Organization.name == name)).first()

    def list(self) -> Sequence[Organization]:
        query = select(Organization).order_by(Organization.created_at, Organization.id)
        return self.session.scalars(query).all()

    def lock(self, organization_id: str) -> None:
        """Serialise this organisation's writers until the transaction ends (a per-organisation quota
        check counts, then inserts). A write, not `SELECT ... FOR UPDATE`: SQLite ignores FOR UPDATE and
        runs reads outside any transaction until the first write, so only a write takes its database lock
        (waiting out `busy_timeout`) before the count; on Postgres it takes the row lock."""
        self.session.execute(
            update(Organization).where(Organization.id == organization_id).values(id=Organization.id),
            execution_options={"synchronize_session": False},
        )


class ApiKeys:
    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, organization: Organization | None, name: str = "") -> tuple[ApiKey, str]:
        """A new key for `organization` (None: an admin key), and the key itself (never stored)."""
        key_id = random_id("", 12)
        prefix = ADMIN_KEY_PREFIX if organization is None else KEY_PREFIX
        key = f"{prefix}{key_id}-{secrets.token_urlsafe(32)}"
        row = ApiKey(
            id=key_id,
            organization_id=organization.id if organization else None,
            name=name,
            key_hash=hash_key(key),
            redacted=f"{prefix}{key_id[:4]}...{key[-4:]}",
            created_at=int(time.time()),
        )
        self.session.add(row)
        self.session.flush()
        return row, key

    def get(self, key_id: str) -> ApiKey | None:
        return self.session.get(ApiKey, key_id)

    def list(self, organization_id: str | None = None, *, admin: bool = False) -> Sequence[ApiKey]:
        """An organisation's keys, the admin keys (`admin`), or every key."""
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if admin:
            query = query.where(ApiKey.organization_id.is_(None))
        elif organization_id is not None:
            query = query.where(ApiKey.organization_id == organization_id)
        return self.session.scalars(query).all()

    def revoke(self, key: ApiKey) -> None:
        if key.revoked_at is None:
            key.revoked_at = int(time.time())

    def authenticate(self, key: str) -> Principal | None:
        """The principal of a valid, unrevoked key; None for anything else."""
        key_id = _parse(key)
        row = self.get(key_id) if key_id else None
        if row is None or not hmac.compare_digest(row.key_hash, hash_key(key)) or row.revoked_at is not None:
            return None
        now = int(time.time())
        if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
            row.last_used_at = now
        return Principal(row.id, row.organization_id)

    def ensure_admin_key(self) -> str | None:
        """A new admin key if there is no unrevoked one (first start, or after revoking the last), else
        None. The caller shows it once."""
        if any(key.revoked_at is None for key in self.list(admin=True)):
            return None
        return self.create(None, "admin (generated at first start)")[1]
