"""Build a job runner from settings (used by the Celery worker and by `ftjobs up`)."""

from models.db import make_engine, make_session_factory
from models.migrate import upgrade
from models.settings import Settings
from models.storage import LocalArtifactStore
from worker.runner import JobRunner


def make_runner(settings: Settings, *, migrate: bool = True) -> JobRunner:
    url = settings.resolved_database_url()
    if migrate:
        upgrade(url)
    return JobRunner(
        settings, make_session_factory(make_engine(url)), LocalArtifactStore(settings.artifacts_root)
    )
