"""create files jobs events checkpoints models

Revision ID: 91aa3d024ca2
Revises:
Create Date: 2026-11-22 23:53:21.811735
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "91aa3d024ca2"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "file",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.String(length=512), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("storage_key", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_file")),
        sa.UniqueConstraint("id", name=op.f("uq_file_id")),
    )
    with op.batch_alter_table("file", schema=None) as batch_op:
        batch_op.create_index("ix_file_org_seq", ["organization_id", "seq"], unique=False)

    op.create_table(
        "fine_tuning_job",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("training_file", sa.String(length=64), nullable=False),
        sa.Column("validation_file", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column(
            "method",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=False,
        ),
        sa.Column(
            "hyperparameters",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=True,
        ),
        sa.Column("suffix", sa.String(length=64), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column(
            "metadata",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=True,
        ),
        sa.Column(
            "integrations",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=True,
        ),
        sa.Column("fine_tuned_model", sa.String(length=256), nullable=True),
        sa.Column("trained_tokens", sa.BigInteger(), nullable=True),
        sa.Column(
            "result_files",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=False,
        ),
        sa.Column(
            "error",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=True,
        ),
        sa.Column("estimated_finish", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=True),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        sa.Column("adapter_key", sa.String(length=256), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.Float(), nullable=True),
        sa.Column("heartbeat_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_fine_tuning_job")),
        sa.UniqueConstraint("id", name=op.f("uq_fine_tuning_job_id")),
    )
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.create_index("ix_fine_tuning_job_org_seq", ["organization_id", "seq"], unique=False)
        batch_op.create_index("ix_fine_tuning_job_status", ["status"], unique=False)

    op.create_table(
        "registered_model",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_registered_model")),
    )
    op.create_table(
        "fine_tuning_job_checkpoint",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("step_number", sa.Integer(), nullable=False),
        sa.Column(
            "metrics",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=False,
        ),
        sa.Column("fine_tuned_model_checkpoint", sa.String(length=300), nullable=False),
        sa.Column("storage_key", sa.String(length=256), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["fine_tuning_job.id"],
            name=op.f("fk_fine_tuning_job_checkpoint_job_id_fine_tuning_job"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_fine_tuning_job_checkpoint")),
        sa.UniqueConstraint("id", name=op.f("uq_fine_tuning_job_checkpoint_id")),
    )
    with op.batch_alter_table("fine_tuning_job_checkpoint", schema=None) as batch_op:
        batch_op.create_index("ix_fine_tuning_job_checkpoint_job_seq", ["job_id", "seq"], unique=False)

    op.create_table(
        "fine_tuning_job_event",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("level", sa.String(length=8), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column(
            "data",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=True,
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["fine_tuning_job.id"],
            name=op.f("fk_fine_tuning_job_event_job_id_fine_tuning_job"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_fine_tuning_job_event")),
        sa.UniqueConstraint("id", name=op.f("uq_fine_tuning_job_event_id")),
    )
    with op.batch_alter_table("fine_tuning_job_event", schema=None) as batch_op:
        batch_op.create_index("ix_fine_tuning_job_event_job_seq", ["job_id", "seq"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("fine_tuning_job_event", schema=None) as batch_op:
        batch_op.drop_index("ix_fine_tuning_job_event_job_seq")

    op.drop_table("fine_tuning_job_event")
    with op.batch_alter_table("fine_tuning_job_checkpoint", schema=None) as batch_op:
        batch_op.drop_index("ix_fine_tuning_job_checkpoint_job_seq")

    op.drop_table("fine_tuning_job_checkpoint")
    op.drop_table("registered_model")
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.drop_index("ix_fine_tuning_job_status")
        batch_op.drop_index("ix_fine_tuning_job_org_seq")

    op.drop_table("fine_tuning_job")
    with op.batch_alter_table("file", schema=None) as batch_op:
        batch_op.drop_index("ix_file_org_seq")

    op.drop_table("file")
