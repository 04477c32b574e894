"""storage quota

Each organisation's storage limit (None: the server's default), and the sizes of what jobs publish in the
artifact store (adapter and merged export, checkpoints), so an organisation's usage is one query. Artifacts
published before this revision have no size and count as 0.

Revision ID: 1bbcd2e15999
Revises: 03c2ec96ae8b
Create Date: 2026-12-07 02:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "1bbcd2e15999"
down_revision: str | None = "03c2ec96ae8b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("organization", schema=None) as batch_op:
        batch_op.add_column(sa.Column("storage_quota_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("artifact_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("fine_tuning_job_checkpoint", schema=None) as batch_op:
        batch_op.add_column(sa.Column("bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_job_checkpoint", schema=None) as batch_op:
        batch_op.drop_column("bytes")
    with op.batch_alter_table("fine_tuning_job", schema=None) as batch_op:
        batch_op.drop_column("artifact_bytes")
    with op.batch_alter_table("organization", schema=None) as batch_op:
        batch_op.drop_column("storage_quota_bytes")
