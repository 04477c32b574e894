"""Apply the Alembic migrations in `migrations/` (at start of every process, and from tests)."""

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.orm import Session, sessionmaker

import migrations
from models.db import make_engine, make_session_factory
from models.settings import Settings


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", database_url)
    config.set_main_option(
        "file_template", "%%(year)d-%%(month).2d-%%(day).2d-%%(hour).2d%%(minute).2d_%%(slug)s"
    )
    return config


def upgrade(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


def open_database(settings: Settings) -> sessionmaker[Session]:
    """Migrate the configured database to head, then hand out sessions on it (every process starts so)."""
    url = settings.resolved_database_url()
    upgrade(url)
    return make_session_factory(make_engine(url))
