"""Build a job runner from settings (used by the Celery worker and by `ftjobs up`)."""

from models.migrate import open_database
from models.settings import Settings
from models.storage import open_store
from worker.executors import make_executor
from worker.runner import JobRunner


def make_runner(settings: Settings) -> JobRunner:
    return JobRunner(settings, open_database(settings), open_store(settings), make_executor(settings))
