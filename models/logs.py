"""Logging for the server commands (`ftjobs up`, `api`, `worker`, `serve`): one setup for all of them.

Text lines for a terminal or JSON lines (one object a record, for a log collector), chosen by
`FTJOBS_LOG_FORMAT`. Every record carries the request and the job it belongs to: the API's `RequestId`
middleware and the job runner set the context variables below, and a filter on the handler copies them
onto each record, whichever library logged it.
"""

import logging
import logging.config
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from models.settings import Settings

request_id: ContextVar[str | None] = ContextVar("ftjobs_request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("ftjobs_job_id", default=None)
CONTEXT_FIELDS = ("request_id", "job_id")


@contextmanager
def job_context(job: str) -> Iterator[None]:
    """Every record logged inside (by this thread or task) names `job`."""
    token = job_id.set(job)
    try:
        yield
    finally:
        job_id.reset(token)


class ContextFilter(logging.Filter):
    """Stamp records with the current request and job ids (only those that are set)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, variable in zip(CONTEXT_FIELDS, (request_id, job_id), strict=True):
            value = variable.get()
            if value is not None:
                setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """A classic line, with the request and job ids after the message when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name)]
        return f"{line} [{' '.join(ids)}]" if ids else line


def json_formatter() -> logging.Formatter:
    """One JSON object a line: time (ISO 8601, UTC), level, logger, process, message, then the record's
    extras (request_id, job_id, an access line's method, route, status...) and exc_info if it has one."""
    return JsonFormatter(
        "%(levelname)s %(name)s %(process)d %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
    )


def text_formatter() -> logging.Formatter:
    return TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def logging_config(settings: Settings, level: str | None = None, *, default: str = "info") -> dict[str, Any]:
    """A `logging.config.dictConfig` dict: one stderr handler on the root logger, which uvicorn's and
    Celery's loggers propagate to. It is a dict so uvicorn can apply it in each of its worker processes.

    The level is `level` (a command's flag), else FTJOBS_LOG_LEVEL, else the command's `default`.
    """
    chosen = (level or settings.log_level or default).upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}},
        "formatters": {
            "default": {"()": json_formatter if settings.log_format == "json" else text_formatter}
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["context"],
            }
        },
        "root": {"level": chosen, "handlers": ["default"]},
        # uvicorn's own loggers otherwise keep handlers of their own (and text lines).
        "loggers": {
            name: {"handlers": [], "propagate": True, "level": chosen}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def configure_logging(
    settings: Settings, level: str | None = None, *, default: str = "info"
) -> dict[str, Any]:
    """Apply `logging_config` to this process; returns it (for uvicorn's `log_config`)."""
    config = logging_config(settings, level, default=default)
    logging.config.dictConfig(config)
    return config
