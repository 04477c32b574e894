"""model registry: content hash, merged export, model-name indexes

Revision ID: b26329836ab0
Revises: 7af70a82f5a7
Create Date: 2026-11-23 05:58:19.620054
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b26329836ab0"
down_revision: str | None = "7af70a82f5a7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("export_merged", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("merged_key", sa.String(length=256), nullable=True))
        batch_op.create_index("ix_fine_tuning_job_fine_tuned_model", ["fine_tuned_model"], unique=False)

    with op.batch_alter_table("fine_tuning_job_checkpoint", schema=None) as batch_op:
        batch_op.create_index(
            "ix_fine_tuning_job_checkpoint_model", ["fine_tuned_model_checkpoint"], unique=False
        )

    with op.batch_alter_table("registered_model", schema=None) as batch_op:
        batch_op.add_column(sa.Column("content_hash", sa.String(length=80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("registered_model", schema=None) as batch_op:
        batch_op.drop_column("content_hash")

    with op.batch_alter_table("fine_tuning_job_checkpoint", schema=None) as batch_op:
        batch_op.drop_index("ix_fine_tuning_job_checkpoint_model")

    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.drop_index("ix_fine_tuning_job_fine_tuned_model")
        batch_op.drop_column("merged_key")
        batch_op.drop_column("export_merged")
