"""Scheduler benchmark (`make bench-scheduler`), not a test: on a scratch Postgres database,

1. claim latency: 10,000 queued jobs of 10 organisations, 50 concurrent claimers (each its own worker and
   connection) each claiming and then finishing jobs; p50/p99 of one claim transaction (the advisory lock
   wait included). Target p99 <= 50 ms. Two rounds, each starting with 10,000 queued jobs: the claimers as
   processes, as a fleet of workers is (no shared GIL), and as threads of one process, as this bench
   measured before. Each claimer first makes one claim unmeasured (a running worker's connection is open
   and its statements compiled). On one machine both rounds overstate what a fleet sees: the claimers' own
   work shares the CPUs with Postgres, which runs the serialised part; processes more so (50 interpreters
   at once, where threads run Python one at a time), so on a few cores the processes' figure is the higher.
2. a simulated day: 6 one-device workers, 3 organisations of weights 1:2:3 submitting bursts at random
   times, jobs of 10-60 simulated minutes; the real claim runs at each simulated event. Each organisation's
   share of device-time while all three have work queued, against its weight's share (target: within 10 %).

The last line prints both results. FTJOBS_BENCH_PG (default postgresql://postgres@127.0.0.1:5432/postgres)
is the server; the database is created and dropped.
"""

import argparse
import heapq
import multiprocessing
import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import psycopg
from psycopg import sql
from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from models.db import make_session_factory, session_scope
from models.migrate import upgrade
from models.orm import Job, Organization
from models.scheduling import Capacity, Scheduler
from models.states import JobStatus, transition

PG_ADMIN = os.environ.get("FTJOBS_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
WINDOW = 86400.0
CPU = Capacity(1, "cpu")


@contextmanager
def scratch_database() -> Iterator[str]:
    name = f"ftjobs_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def job_row(n: int, org: str, created_at: float, priority: int = 5) -> dict[str, object]:
    return {
        "id": f"ftjob-bench-{n}",
        "organization_id": org,
        "model": "m",
        "training_file": "file-x",
        "status": JobStatus.QUEUED.value,
        "method": {"type": "supervised"},
        "seed": 1,
        "result_files": [],
        "created_at": int(created_at),
        "attempt": 0,
        "priority": priority,
    }


def finish(session: Session, job_id: str, device_seconds: float) -> None:
    transition(
        session,
        job_id,
        from_=JobStatus.RUNNING,
        to=JobStatus.SUCCEEDED,
        values={"device_seconds": device_seconds},
    )


def claims(factory: sessionmaker[Session], worker: str, count: int, start: threading.Barrier) -> list[float]:
    """One claim unmeasured (its connection opened, its statements compiled: a running worker's are), then,
    once every claimer is ready, `count` claims, each job finished before the next; each claim's seconds."""
    latencies = []
    for n in range(count + 1):
        if n == 1:
            start.wait()
        began = time.perf_counter()
        with session_scope(factory) as session:
            job = Scheduler(session, window_seconds=WINDOW).claim_next(worker, CPU, now=time.time())
        latencies.append(time.perf_counter() - began)
        assert job is not None
        with session_scope(factory) as session:
            finish(session, job.id, 1.0)
    return latencies[1:]


def claimer_process(url: str, worker: str, count: int, start: Barrier, results: "Queue[list[float]]") -> None:
    engine = create_engine(url, pool_size=1)
    results.put(claims(make_session_factory(engine), worker, count, start))
    engine.dispose()


def claim_latency(url: str, *, jobs: int, claimers: int, claims_each: int, processes: bool) -> list[float]:
    """Queue `jobs` more, then `claimers` claimers (processes or threads) start together."""
    rng = random.Random(1)
    now = time.time()
    engine = create_engine(url, pool_size=claimers + 5, max_overflow=10)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        done = session.scalar(select(func.count()).where(Job.status == JobStatus.SUCCEEDED.value)) or 0
        first = session.scalar(select(func.count()).select_from(Job)) or 0
        rows = [job_row(n, f"org-{n % 10}", now, rng.randint(0, 9)) for n in range(first, first + jobs)]
        if rows:  # none: claim from what an earlier round left queued
            session.execute(insert(Job), rows)
    with session_scope(factory) as session:
        # Statistics, as a running database has (autovacuum gathers them within a minute of a bulk insert):
        # without them Postgres finds a job by id through the partial index of queued jobs, every one of them.
        session.execute(text("ANALYZE fine_tuning_job"))
    latencies: list[float] = []
    if processes:
        engine.dispose()  # forked children must not share its connections
        fork = multiprocessing.get_context("fork")
        start, results = fork.Barrier(claimers), fork.Queue()
        children = [
            fork.Process(target=claimer_process, args=(url, f"bench-{i}", claims_each, start, results))
            for i in range(claimers)
        ]
        for child in children:
            child.start()
        for _ in children:
            latencies += results.get()
        for child in children:
            child.join()
            assert child.exitcode == 0, "a claimer failed"
    else:
        lock = threading.Lock()
        begin = threading.Barrier(claimers)

        def claimer(worker: str) -> None:
            took = claims(factory, worker, claims_each, begin)
            with lock:
                latencies.extend(took)

        threads = [threading.Thread(target=claimer, args=(f"bench-{i}",)) for i in range(claimers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    with session_scope(factory) as session:
        counted = session.scalar(select(func.count()).where(Job.status == JobStatus.SUCCEEDED.value))
    engine.dispose()
    assert counted == done + claimers * (claims_each + 1), "a job was claimed twice"
    return latencies


def simulated_day(factory: sessionmaker[Session], *, workers: int, seed: int) -> dict[str, float]:
    """Each organisation's share of device-time while all three had work queued, minus its weight share,
    relative to the weight share."""
    rng = random.Random(seed)
    weights = {"org-a": 1.0, "org-b": 2.0, "org-c": 3.0}
    with session_scope(factory) as session:
        for org, weight in weights.items():
            session.add(Organization(id=org, name=org, created_at=0, share_weight=weight))
    t0 = time.time() - 2 * 86400  # the past: month budgets and windows don't matter
    arrivals: list[tuple[float, str, int]] = []  # (time, org, jobs)
    for org in weights:
        for _ in range(8):
            arrivals.append((t0 + rng.uniform(0, 86400 * 0.9), org, rng.randint(20, 40)))
    arrivals.sort()
    running: list[tuple[float, str, str, float]] = []  # heap of (end, job, worker, duration)
    free = [f"sim-{i}" for i in range(workers)]
    org_of: dict[str, str] = {}
    used = dict.fromkeys(weights, 0.0)
    queued = dict.fromkeys(weights, 0)
    n = 0
    now = t0
    while now < t0 + 86400:
        upcoming = [
            t for t in (arrivals[0][0] if arrivals else None, running[0][0] if running else None) if t
        ]
        step_to = min([*upcoming, t0 + 86400])
        if all(queued.values()):  # device-time of the interval, while every organisation waits for more
            for _, job_id, _, _ in running:
                used[org_of[job_id]] += step_to - now
        now = step_to
        with session_scope(factory) as session:
            while running and running[0][0] <= now:
                _, job_id, worker, duration = heapq.heappop(running)
                finish(session, job_id, duration)
                free.append(worker)
            while arrivals and arrivals[0][0] <= now:
                _, org, count = arrivals.pop(0)
                rows = [job_row(n + i, org, now) for i in range(count)]
                session.execute(insert(Job), rows)
                org_of.update({str(row["id"]): org for row in rows})
                queued[org] += count
                n += count
        while free:
            with session_scope(factory) as session:
                job = Scheduler(session, window_seconds=WINDOW).claim_next(free[-1], CPU, now=now)
                if job is None:
                    break
                duration = rng.uniform(600, 3600)
                heapq.heappush(running, (now + duration, job.id, free.pop(), duration))
                queued[job.organization_id] -= 1
    total, weight_total = sum(used.values()), sum(weights.values())
    return {org: (used[org] / total - w / weight_total) / (w / weight_total) for org, w in weights.items()}


def percentiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99, in milliseconds."""
    return statistics.median(latencies) * 1000, statistics.quantiles(latencies, n=100)[98] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--claimers", type=int, default=50)
    parser.add_argument("--claims-each", type=int, default=20)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    latencies: dict[str, list[float]] = {}
    with scratch_database() as url:
        for name in ("processes", "threads"):
            queued = args.claimers * (args.claims_each + 1) if latencies else args.jobs  # back to --jobs
            latencies[name] = claim_latency(
                url,
                jobs=queued,
                claimers=args.claimers,
                claims_each=args.claims_each,
                processes=name == "processes",
            )
        alone = claim_latency(url, jobs=0, claimers=1, claims_each=50, processes=False)
    (p50, p99), (threads_p50, threads_p99) = (
        percentiles(latencies["processes"]),
        percentiles(latencies["threads"]),
    )
    claimed = len(latencies["processes"])
    print(f"claims: {claimed} per round by {args.claimers} claimers over {args.jobs} queued jobs")
    print(f"one claimer alone (no lock wait): p50 {statistics.median(alone) * 1000:.1f} ms", flush=True)
    with scratch_database() as url:
        engine = create_engine(url, pool_size=5)
        deviation = simulated_day(make_session_factory(engine), workers=6, seed=7)
        engine.dispose()
    for org, relative in deviation.items():
        print(f"{org}: share off its weight share by {relative:+.1%}")
    worst = max(abs(value) for value in deviation.values())
    print(f"load average after: {os.getloadavg()}")
    print(
        f"claim latency p50 {p50:.1f} ms, p99 {p99:.1f} ms with claimer processes, p50 {threads_p50:.1f} ms, "
        f"p99 {threads_p99:.1f} ms with threads (target p99 <= 50 ms); "
        f"fair share worst deviation {worst:.1%} of the weight share (target <= 10 %)"
    )


if __name__ == "__main__":
    main()
