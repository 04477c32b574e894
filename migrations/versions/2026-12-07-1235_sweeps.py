"""sweeps

Hyperparameter sweeps (extension): `fine_tuning_sweep`, and `fine_tuning_sweep_trial` naming each trial's
job and the parameters it was given.

Revision ID: 8e4f2b6c1d37
Revises: 5d0c1e7a9b21
Create Date: 2026-12-07 12:35:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "8e4f2b6c1d37"
down_revision: str | None = "5d0c1e7a9b21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSONType = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
)


def upgrade() -> None:
    op.create_table(
        "fine_tuning_sweep",
        sa.Column("seq", SEQ, autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("base", JSONType, nullable=False),
        sa.Column("search_space", JSONType, nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=True),
        sa.Column("max_trials", sa.Integer(), nullable=False),
        sa.Column("parallelism", sa.Integer(), nullable=False),
        sa.Column("early_stopping", sa.Boolean(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("error", JSONType, nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
    )
    op.create_index("ix_fine_tuning_sweep_org_seq", "fine_tuning_sweep", ["organization_id", "seq"])
    op.create_table(
        "fine_tuning_sweep_trial",
        sa.Column("seq", SEQ, autoincrement=True, nullable=False),
        sa.Column("sweep_id", sa.String(length=64), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("params", JSONType, nullable=False),
        sa.Column("pruned", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.ForeignKeyConstraint(["sweep_id"], ["fine_tuning_sweep.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("job_id"),
        sa.UniqueConstraint("sweep_id", "number"),
    )


def downgrade() -> None:
    op.drop_table("fine_tuning_sweep_trial")
    op.drop_index("ix_fine_tuning_sweep_org_seq", table_name="fine_tuning_sweep")
    op.drop_table("fine_tuning_sweep")
