"""The Celery app both sides share: the API publishes wake-ups, workers consume them.

A message carries only a job id; Postgres holds the job. Settings suit multi-hour tasks: early ack
(the database, not the broker, recovers crashed jobs), one message per worker process at a time,
JSON only, no result backend.
"""

from celery import Celery

from models.settings import Settings

RUN_JOB = "ftjobs.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("ftjobs", broker=settings.broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        task_default_queue=settings.worker_queue,
        broker_connection_retry_on_startup=True,
        # Publishing must not hang an API request when Redis is down; the job is already committed.
        broker_transport_options={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
        worker_hijack_root_logger=False,
    )
    return app
