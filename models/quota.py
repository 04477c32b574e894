"""Storage quota per organisation: the bytes its files and its jobs' published artifacts (adapters, merged
exports, checkpoints) hold in the artifact store, against a limit the admin sets.

Usage is summed from the rows that name the stored objects, so deleting a file or a model frees its bytes
with nothing else to keep in step. A check and the insert it allows run in one transaction under the
organisation's row lock, so two writers can't both take the last bytes.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.auth import Organizations
from models.orm import File, Job, JobCheckpoint


class QuotaExceeded(Exception):
    code = "storage_quota_exceeded"

    def __init__(self, usage: "Usage", adding: int) -> None:
        super().__init__(
            f"The organization's storage quota is {usage.limit} bytes and {usage.used} are in use: "
            f"{adding} more bytes do not fit. Delete files or fine-tuned models to free space, or ask the "
            "administrator for a larger quota."
        )


@dataclass(frozen=True)
class Usage:
    used: int
    limit: int
    """The limit in force: the organisation's own, else the server's default (0: none)."""

    @property
    def headroom(self) -> int | None:
        """Bytes that still fit (None: no limit)."""
        return max(0, self.limit - self.used) if self.limit else None

    def check(self, adding: int) -> None:
        headroom = self.headroom
        if headroom is not None and adding > headroom:
            raise QuotaExceeded(self, adding)


def directory_bytes(path: Path) -> int:
    """Size of a local file or directory tree, as the artifact store will hold it."""
    if path.is_file():
        return path.stat().st_size
    return sum((Path(root) / name).stat().st_size for root, _, names in os.walk(path) for name in names)


class StorageQuota:
    def __init__(self, session: Session, default_limit: int) -> None:
        self.session, self.default_limit = session, default_limit

    def usage(self, organization_id: str) -> Usage:
        organization = Organizations(self.session).get(organization_id)
        own = organization.storage_quota_bytes if organization is not None else None
        return Usage(self._used(organization_id), self.default_limit if own is None else own)

    def reserve(self, organization_id: str, adding: int) -> None:
        """Raise QuotaExceeded unless `adding` more bytes fit; otherwise hold the organisation's lock until
        the transaction ends, so the caller's insert counts before any other writer checks."""
        Organizations(self.session).lock(organization_id)
        self.usage(organization_id).check(adding)

    def _used(self, organization_id: str) -> int:
        files = select(func.coalesce(func.sum(File.bytes), 0)).where(File.organization_id == organization_id)
        published = select(func.coalesce(func.sum(Job.artifact_bytes), 0)).where(
            Job.organization_id == organization_id, Job.adapter_key.is_not(None)
        )
        checkpoints = (
            select(func.coalesce(func.sum(JobCheckpoint.bytes), 0))
            .join(Job, Job.id == JobCheckpoint.job_id)
            .where(Job.organization_id == organization_id)
        )
        total = select(files.scalar_subquery() + published.scalar_subquery() + checkpoints.scalar_subquery())
        return int(self.session.scalar(total) or 0)
