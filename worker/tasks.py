"""Celery entry point (`celery -A worker.tasks worker`): a thin task around the job runner.

The message carries only the job id; the runner re-reads everything from the database and claims the
job with a compare-and-set, so a duplicate delivery does nothing.
"""

from functools import cache

from models.queue import RUN_JOB, make_celery
from models.settings import get_settings
from worker.runner import JobRunner
from worker.runtime import make_runner

app = make_celery(get_settings())


@cache
def runner() -> JobRunner:
    return make_runner(get_settings())


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> None:
    runner().run(job_id)
