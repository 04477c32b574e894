"""scheduling

Worker capacity (`worker`), the job's scheduling columns (devices and device class out of `compute`,
priority, preemptible, device-seconds used, the claiming worker, why it waits, what preempted it), and each
organisation's policy (fair-share weight, per-class device caps, monthly device-hour budget).

Revision ID: 73633dabd6da
Revises: eb8cb347a710
Create Date: 2026-12-07 04:53:12.972706
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "73633dabd6da"
down_revision: str | None = "eb8cb347a710"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
)


def upgrade() -> None:
    op.create_table(
        "worker",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("device_class", sa.String(length=64), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_worker")),
    )
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("devices", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("device_class", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("priority", sa.Integer(), server_default="5", nullable=False))
        batch_op.add_column(
            sa.Column("preemptible", sa.Boolean(), server_default=sa.text("false"), nullable=False)
        )
        batch_op.add_column(sa.Column("device_seconds", sa.Float(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("worker_id", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("wait_reason", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("preempted_by", sa.String(length=64), nullable=True))
        batch_op.create_index(
            "ix_fine_tuning_job_claim", ["status", "organization_id", "priority", "seq"], unique=False
        )
    with op.batch_alter_table("organization", schema=None) as batch_op:
        batch_op.add_column(sa.Column("share_weight", sa.Float(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("device_caps", JSON, nullable=True))
        batch_op.add_column(sa.Column("monthly_device_hours", sa.Float(), nullable=True))
    # Jobs created before: their devices and class move out of `compute` into the claim's columns.
    job = sa.table(
        "fine_tuning_job",
        sa.column("id", sa.String),
        sa.column("compute", JSON),
        sa.column("devices", sa.Integer),
        sa.column("device_class", sa.String),
    )
    connection = op.get_bind()
    for job_id, compute in connection.execute(
        sa.select(job.c.id, job.c.compute).where(job.c.compute.is_not(None))
    ):
        connection.execute(
            job.update()
            .where(job.c.id == job_id)
            .values(devices=compute.get("devices", 1), device_class=compute.get("device_class"))
        )


def downgrade() -> None:
    with op.batch_alter_table("organization", schema=None) as batch_op:
        batch_op.drop_column("monthly_device_hours")
        batch_op.drop_column("device_caps")
        batch_op.drop_column("share_weight")
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.drop_index("ix_fine_tuning_job_claim")
        for column in (
            "preempted_by",
            "wait_reason",
            "worker_id",
            "device_seconds",
            "preemptible",
            "priority",
            "device_class",
            "devices",
        ):
            batch_op.drop_column(column)
    op.drop_table("worker")
