"""Build a job runner from settings (used by the Celery worker and by `ftjobs up`), and keep its capacity
registered while the process lives."""

import logging
import threading
import time

from models.db import session_scope
from models.migrate import open_database
from models.scheduling import Workers
from models.settings import Settings
from models.storage import open_store
from worker.executors import make_executor
from worker.runner import JobRunner

log = logging.getLogger("ftjobs.worker")


def make_runner(settings: Settings) -> JobRunner:
    return JobRunner(settings, open_database(settings), open_store(settings), make_executor(settings))


def keep_registered(runner: JobRunner) -> threading.Event:
    """Record the runner's capacity now, then renew it in a daemon thread until the returned event is set:
    a worker whose heartbeat is older than a lease counts as gone (docs/scheduling.md)."""
    stop = threading.Event()

    def register() -> None:
        with session_scope(runner.session_factory) as session:
            Workers(session).register(runner.worker_id, runner.capacity, now=time.time())

    def beat() -> None:
        while not stop.wait(runner.settings.lease_seconds / 4):
            try:
                register()
            except Exception:  # the database may be down; the next beat tries again
                log.exception("could not renew the worker's registration")

    register()
    threading.Thread(target=beat, name="ftjobs-capacity", daemon=True).start()
    return stop
