"""Alembic environment: runs against the URL the caller put in the config (see models/migrate.py)."""

from alembic import context
from sqlalchemy import text

import models.orm  # noqa: F401  (registers every table on Base.metadata)
from models.db import Base, make_engine

# Several processes (API, workers) may start at once; one upgrades, the others wait on this lock.
_PG_LOCK_ID = 7_102_931


def run_migrations_online() -> None:
    engine = make_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        postgres = connection.dialect.name == "postgresql"
        if postgres:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _PG_LOCK_ID})
            connection.commit()
        try:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
        finally:
            if postgres:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _PG_LOCK_ID})
                connection.commit()
    engine.dispose()


run_migrations_online()
