"""Prometheus metrics at /metrics: the jobs, read from the database at scrape time, and the API's latency.

Job figures are queried when Prometheus scrapes rather than counted in this process: Postgres holds the
jobs, so every API process reports the same numbers and a restart loses none. Each figure is one aggregate
query returning a row per label set, however many jobs there are (docs/observability.md says what they
cost). Request latency is this process's own; with `ftjobs api --workers N` the processes pool it through
prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, which `ftjobs api` sets up).
"""

import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from fastapi import APIRouter, Request, Response
from fastapi.routing import iter_route_contexts
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.jobs import WAITING, Distribution, JobStatistics
from models.scheduling import Usage
from models.states import JobStatus

log = logging.getLogger("ftjobs.api")
access_log = logging.getLogger("ftjobs.access")

WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
TOKENS_PER_SECOND_BUCKETS = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"
"""The route label of a request no route matches: never the raw path, which anyone can vary at will."""
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
"""Polled every few seconds: the access lines of their successes are at debug level, not info."""


class Metrics:
    """One app's metrics: the request-latency histogram, the job figures, and what /metrics exposes."""

    def __init__(self, engine: Engine) -> None:
        registry = CollectorRegistry()
        self.latency = Histogram(
            "ftjobs_http_request_duration_seconds",
            "API requests by method, route template and status code, until the last byte of the response.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        jobs = JobCollector(engine)
        registry.register(jobs)
        if directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Every process writes its latency to files there: whichever process is scraped answers for all.
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed, directory)
            self.exposed.register(jobs)
        else:
            ProcessCollector(registry=registry)  # this process's CPU, memory and open files
            self.exposed = registry


@contextmanager
def shared_across_processes(processes: int) -> Iterator[None]:
    """For `ftjobs api --workers N`: give the API processes a fresh PROMETHEUS_MULTIPROC_DIR (unless one
    is set), so each scrape shows all their requests, not those of whichever process answers."""
    if processes == 1 or "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="ftjobs-metrics-") as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # the worker processes inherit it
        try:
            yield
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


class JobCollector(Collector):
    """The jobs' figures, queried from the database at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> Iterable[Metric]:
        return []  # so registering it does not query the database

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ftjobs_job_metrics_up", "1 if the job figures were read from the database, 0 if it failed."
        )
        try:
            with Session(self.engine) as session:
                families = list(_job_families(JobStatistics(session), time.time()))
                families.append(_usage_family(Usage(session).total_seconds()))
        except SQLAlchemyError as error:
            log.warning("job metrics: database unavailable: %s", error)
            families = []
        up.add_metric([], 1 if families else 0)
        yield up
        yield from families


def _usage_family(seconds: dict[str, float]) -> Metric:
    family = CounterMetricFamily(
        "ftjobs_organization_device_seconds",
        "Devices times seconds the organisation's jobs have held them (docs/scheduling.md).",
        labels=["organization_id"],
    )
    for organization_id, total in sorted(seconds.items()):
        family.add_metric([organization_id], total)
    return family


def _job_families(stats: JobStatistics, now: float) -> Iterator[Metric]:
    counts = stats.count_by_status()
    jobs = GaugeMetricFamily("ftjobs_jobs", "Fine-tuning jobs by status.", labels=["status"])
    for status in JobStatus:
        jobs.add_metric([status.value], counts.get(status.value, 0))
    yield jobs
    yield GaugeMetricFamily(
        "ftjobs_queue_depth",
        "Jobs waiting for a worker (validating_files or queued).",
        value=sum(counts.get(status, 0) for status in WAITING),
    )
    oldest = stats.oldest_waiting_since()
    yield GaugeMetricFamily(
        "ftjobs_queue_oldest_wait_seconds",
        "How long the longest-waiting job has waited for a worker (0 when none waits).",
        value=max(0.0, now - oldest) if oldest is not None else 0.0,
    )
    yield _histogram(
        HistogramMetricFamily(
            "ftjobs_job_queue_wait_seconds",
            "Time from a job's creation to the start of its (latest) attempt, for jobs that started.",
        ),
        stats.queue_waits(WAIT_BUCKETS),
    )
    yield _histogram(
        HistogramMetricFamily(
            "ftjobs_job_duration_seconds",
            "Wall-clock time of finished jobs' (last) attempt, start to finish, by final status.",
            labels=["status"],
        ),
        stats.durations(DURATION_BUCKETS),
    )
    yield _histogram(
        HistogramMetricFamily(
            "ftjobs_job_training_tokens_per_second",
            "Succeeded single-attempt jobs' trained tokens over their wall-clock duration (loading and "
            "evaluation included), by base model and training type.",
            labels=["model", "training_type"],
        ),
        stats.training_rates(TOKENS_PER_SECOND_BUCKETS),
    )


def _histogram(family: HistogramMetricFamily, distributions: Sequence[Distribution]) -> HistogramMetricFamily:
    """`family` with a histogram per distribution (per label set)."""
    for distribution in distributions:
        points = [(floatToGoString(bound), n) for bound, n in distribution.buckets]
        family.add_metric(
            list(distribution.labels), [*points, ("+Inf", distribution.count)], distribution.total
        )
    return family


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The path template of the route `scope` goes to (`/v1/files/{file_id}`), or UNMATCHED.

    Matched here rather than read from the scope after routing, so requests the middleware answers (a 401,
    a 429) are labelled with their route too. `iter_route_contexts` walks included routers (FastAPI keeps
    them nested since 0.137) and gives each route's full template, include prefixes and all.
    """
    partial = None
    for context in iter_route_contexts(routes):
        match, _ = context.matches(scope)
        if match is Match.FULL:
            return context.path_format or UNMATCHED
        if match is Match.PARTIAL and partial is None:  # the path matches, the method does not (405)
            partial = context.path_format
    return partial or UNMATCHED


class ObserveRequests:
    """Pure ASGI middleware: time each request into the latency histogram and write its access line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        route = route_template(scope["app"].router.routes, scope)  # before routing rewrites the scope
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before it answers

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            seconds = time.perf_counter() - started
            label = method if method in METHODS else "other"
            scope["app"].state.metrics.latency.labels(label, route, str(status)).observe(seconds)
            access_log.log(
                logging.DEBUG if route in PROBES and status < 400 else logging.INFO,
                "%s %s %s %.1f ms",
                method,
                path,
                status,
                seconds * 1000,
                extra={
                    "method": method,
                    "route": route,
                    "path": path,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 1),
                    "client": scope["client"][0] if scope.get("client") else None,
                },
            )


router = APIRouter(include_in_schema=False)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus text format; no key (keep it on a private network, like /healthz)."""
    return Response(generate_latest(request.app.state.metrics.exposed), media_type=CONTENT_TYPE_LATEST)
