"""Model versions: what `/v1/models` lists and what a request's `model` may name.

A version is a registered base model, the model a succeeded job published (`ft:…`), or one of a job's
checkpoints (`ft:…:ckpt-step-N`). Fine-tuned versions belong to their job's organisation; deleting one
removes its artifact, while the job keeps the name it published (as OpenAI's jobs do).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.orm import Job, JobCheckpoint, RegisteredModel
from models.registry import ModelRegistry
from models.states import JobStatus

CHECKPOINT_MARK = ":ckpt-step-"
TUNED_PREFIX = "ft:"


def root_base(model_id: str) -> str:
    """The registered base a model id stands on: itself, or the first segment of an `ft:{base}:…` name (base
    names hold no `:`, and a model tuned from a tuned model is named after the same base)."""
    return model_id.split(":")[1] if model_id.startswith(TUNED_PREFIX) else model_id


Kind = Literal["base", "fine-tuned", "checkpoint"]


@dataclass(frozen=True)
class ModelVersion:
    id: str
    kind: Kind
    created: int
    base: RegisteredModel | None
    """The registered base (None if it was removed from the registry since)."""
    job: Job | None = None
    checkpoint: JobCheckpoint | None = None

    @property
    def artifact_key(self) -> str | None:
        if self.checkpoint is not None:
            return self.checkpoint.storage_key
        return self.job.adapter_key if self.job is not None else None


class ModelVersions:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.registry = ModelRegistry(session)

    def list(self, organization_id: str) -> list[ModelVersion]:
        """Base models by name, then the organisation's fine-tuned models and checkpoints, newest first."""
        bases = {model.name: model for model in self.registry.list()}
        versions = [ModelVersion(name, "base", model.created_at, model) for name, model in bases.items()]
        jobs = self.session.scalars(
            select(Job)
            .where(Job.organization_id == organization_id, Job.status == JobStatus.SUCCEEDED)
            .where(Job.adapter_key.is_not(None))
            .order_by(Job.seq.desc())
        ).all()
        versions += [self._published(job, bases.get(root_base(job.model))) for job in jobs]
        rows = self.session.execute(
            select(JobCheckpoint, Job)
            .join(Job, Job.id == JobCheckpoint.job_id)
            .where(Job.organization_id == organization_id)
            .order_by(JobCheckpoint.seq.desc())
        ).all()
        versions += [
            self._checkpoint(checkpoint, job, bases.get(root_base(job.model))) for checkpoint, job in rows
        ]
        return versions

    def get(self, organization_id: str, model_id: str) -> ModelVersion | None:
        if not model_id.startswith(TUNED_PREFIX):
            base = self.registry.get(model_id)
            return ModelVersion(base.name, "base", base.created_at, base) if base else None
        if CHECKPOINT_MARK in model_id:
            row = self.session.execute(
                select(JobCheckpoint, Job)
                .join(Job, Job.id == JobCheckpoint.job_id)
                .where(JobCheckpoint.fine_tuned_model_checkpoint == model_id)
                .where(Job.organization_id == organization_id)
            ).first()
            return (
                self._checkpoint(row[0], row[1], self.registry.get(root_base(row[1].model))) if row else None
            )
        job = self.session.scalar(
            select(Job).where(
                Job.fine_tuned_model == model_id,
                Job.organization_id == organization_id,
                Job.status == JobStatus.SUCCEEDED,
                Job.adapter_key.is_not(None),
            )
        )
        return self._published(job, self.registry.get(root_base(job.model))) if job else None

    def delete(self, version: ModelVersion) -> Sequence[str]:
        """Forget a fine-tuned version; return the storage keys whose bytes go once this commits."""
        if version.checkpoint is not None:
            self.session.delete(version.checkpoint)
            return [version.checkpoint.storage_key]
        assert version.job is not None
        keys = [key for key in (version.job.adapter_key, version.job.merged_key) if key]
        version.job.adapter_key = version.job.merged_key = None
        return keys

    @staticmethod
    def _published(job: Job, base: RegisteredModel | None) -> ModelVersion:
        assert job.fine_tuned_model is not None
        return ModelVersion(job.fine_tuned_model, "fine-tuned", job.finished_at or job.created_at, base, job)

    @staticmethod
    def _checkpoint(checkpoint: JobCheckpoint, job: Job, base: RegisteredModel | None) -> ModelVersion:
        return ModelVersion(
            checkpoint.fine_tuned_model_checkpoint, "checkpoint", checkpoint.created_at, base, job, checkpoint
        )
