"""API benchmark: prints throughput, latency and queue figures for the fine-tuning job API. Not a test.

    python bench/api.py [--seconds 3] [--rounds 4] [--concurrency 32] [--samples 5]

One run creates (and drops) its own Postgres databases and measures:
1. req/s, p50 and p99 at concurrency 32 of retrieve, list and create, beside a floor route in the same
   app (one primary-key SELECT through the same session dependency), all served by one uvicorn worker;
2. list p50, one client, with 1,000 jobs in the table vs 100,000 (COPY-loaded; two databases, alternating);
3. queue-to-running latency with an idle real worker: `cli api` + `cli worker` (Postgres + Redis) and
   `cli up` (SQLite).
The client runs in this process and shares the machine's cores with the server and the database.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import redis
import uvicorn
from fastapi import FastAPI

from models.auth import ApiKeys, Organizations
from models.db import make_engine, make_session_factory, session_scope
from models.hyperparameters import SupervisedHyperparameters, resolve
from models.migrate import upgrade
from models.orm import Job, Organization
from models.settings import Settings

# Run as a script, this file's folder comes first on sys.path and `import api` would import this file
# instead of the api package: swap the folder for the repository root (which also holds `tests`).
_HERE = Path(__file__).resolve().parent
REPO = _HERE.parent
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from bench.other_load import OtherLoad  # noqa: E402

TRAIN_SOURCE = REPO.parent / "shared" / "data" / "sentiment_chat" / "train.jsonl"
ORG = "org-local"
MODEL = "tiny-llama"
JOBS = "/v1/fine_tuning/jobs"
TERMINAL = {"succeeded", "failed", "cancelled"}
Headers = dict[str, str]
# Small, fixed hyperparameters so a sample's training child is cheap to start and to cancel.
HYPERPARAMETERS = {"n_epochs": 1, "batch_size": 4, "lora_r": 4, "max_seq_length": 256}


# --- Serving (the `serve` subcommand runs in the uvicorn child process) -----------------------------


def build_app() -> FastAPI:
    """The production app from env settings, plus the floor route (bench only)."""
    from api.deps import SessionDep
    from api.main import create_app

    app = create_app(Settings())  # Celery dispatcher: FTJOBS_WORKER_QUEUE names a queue nobody consumes

    @app.get("/bench/floor/{seq}")
    def floor(seq: int, session: SessionDep) -> dict[str, Any]:
        job = session.get(Job, seq)
        return {"id": job.id, "status": job.status} if job else {}

    return app


def serve(port: int, access_log: bool) -> None:
    # `ftjobs api` logs at info, access lines included; by default the bench measures the app without them.
    uvicorn.run(build_app(), host="127.0.0.1", port=port, log_level="info" if access_log else "warning")


# --- Processes, databases, Redis ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(settings: dict[str, str]) -> dict[str, str]:
    """Children get exactly the bench's FTJOBS_* knobs; an inherited database URL must not leak in. No
    rate limit and no cap on active jobs: the load runs one key far past any sensible one, and its creates
    pile up unconsumed (the key and the count are still checked per request)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FTJOBS_")}
    limits = {"FTJOBS_RATE_LIMIT_PER_MINUTE": "0", "FTJOBS_MAX_ACTIVE_JOBS": str(10**9)}
    return {**inherited, **limits, **settings}


def authorize(database_url: str) -> Headers:
    """Headers with a new API key of ORG, the organisation the bulk-loaded jobs belong to."""
    engine = make_engine(database_url)
    with session_scope(make_session_factory(engine)) as session:
        organization = Organizations(session).get(ORG)
        if organization is None:
            organization = Organization(id=ORG, name="local", created_at=int(time.time()))
            session.add(organization)
            session.flush()  # before its key: no ORM relationship orders the two inserts
        _, key = ApiKeys(session).create(organization, "bench")
    engine.dispose()
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=child_env(env), stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 90
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{what} did not start (exit {proc.poll()}); log tail:\n{tail}")
        time.sleep(0.2)


def healthy(base_url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def cli(args: list[str], env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "cli", *args], env=child_env(env), cwd=REPO, check=True, capture_output=True
    )


@contextmanager
def fresh_database(admin_url: str, purpose: str) -> Iterator[str]:
    """A new, migrated database; yields its psycopg URL and drops it afterwards."""
    name = f"ftjobs_bench_{purpose}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(sqlalchemy_url(url))
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlalchemy_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def delete_queue(redis_url: str, queue: str) -> None:
    """The queue's list and kombu's binding keys; the name is unique to this run."""
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"*{queue}*"))
    if keys:
        client.delete(*keys)


# --- Bulk rows -----------------------------------------------------------------------------------------

_ALPHABET = string.ascii_letters + string.digits
JOB_COLUMNS = (
    "id organization_id model training_file validation_file status method hyperparameters suffix seed "
    "metadata integrations fine_tuned_model trained_tokens result_files error estimated_finish created_at "
    "started_at finished_at adapter_key attempt lease_owner lease_expires_at heartbeat_at"
).split()


def _rid(rng: random.Random, prefix: str) -> str:
    return prefix + "".join(rng.choices(_ALPHABET, k=24))


def job_rows(n: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Finished jobs as the runner leaves them, oldest first, one a minute up to now (JSON as text)."""
    now = int(time.time())
    requested = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    method = json.dumps({"type": "supervised", "supervised": {"hyperparameters": requested}})
    resolved = json.dumps(resolve(SupervisedHyperparameters(), 400, "sft").model_dump())  # chat files
    error = json.dumps(
        {"code": "training_failed", "message": "Training failed: out of memory", "param": None}
    )
    for i in range(n):
        job_id = _rid(rng, "ftjob-")
        status = rng.choices(["succeeded", "failed", "cancelled"], weights=[75, 15, 10])[0]
        ok = status == "succeeded"
        created = now - (n - i) * 60
        finished = created + rng.randint(120, 3600)
        suffix = rng.choice([None, "sentiment", "support-bot", "eval"])
        metadata = {"team": rng.choice(["nlp", "search"]), "run": str(i)} if rng.random() < 0.5 else None
        yield {
            "id": job_id,
            "organization_id": ORG,
            "model": MODEL,
            "training_file": _rid(rng, "file-"),
            "validation_file": _rid(rng, "file-") if rng.random() < 0.5 else None,
            "status": status,
            "method": method,
            "hyperparameters": resolved,
            "suffix": suffix,
            "seed": rng.randint(0, 2147483647),
            "metadata": json.dumps(metadata) if metadata else None,
            "integrations": None,
            "fine_tuned_model": f"ft:{MODEL}:local:{suffix or ''}:{job_id[6:14]}" if ok else None,
            "trained_tokens": rng.randint(10_000, 2_000_000) if ok else None,
            "result_files": json.dumps([_rid(rng, "file-")] if ok else []),
            "error": error if status == "failed" else None,
            "estimated_finish": None,
            "created_at": created,
            "started_at": created + 5,
            "finished_at": finished,
            "adapter_key": f"jobs/{job_id}/attempt-1/adapter" if ok else None,
            "attempt": 1,
            "lease_owner": "worker-1:4242:140211123456",
            "lease_expires_at": finished + 60.0,
            "heartbeat_at": float(finished),
        }


def bulk_insert_jobs(url: str, n: int, seed: int) -> None:
    with psycopg.connect(url) as conn:
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY fine_tuning_job ({', '.join(JOB_COLUMNS)}) FROM STDIN") as copy,
        ):
            for row in job_rows(n, random.Random(seed)):
                copy.write_row([row[column] for column in JOB_COLUMNS])
        conn.commit()
        conn.execute("ANALYZE fine_tuning_job")  # as autovacuum would soon after a big load


def count_jobs(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM fine_tuning_job").fetchone()[0]  # type: ignore[index]


# --- Load generation -----------------------------------------------------------------------------------

Send = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


@dataclass
class Load:
    name: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def add(self, other: "Load") -> None:
        self.latencies += other.latencies
        self.seconds += other.seconds
        self.errors += other.errors

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile in milliseconds."""
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def _load(
    base_url: str, headers: Headers, name: str, send: Send, concurrency: int, seconds: float, warmup: float
) -> Load:
    """`concurrency` closed-loop clients, one connection each; the warm-up opens them and is discarded."""
    # One single-connection client per loop: a shared httpx pool of 32 connections costs the client
    # about twice the CPU per request, and the client shares the cores with the server.
    single = httpx.Limits(max_connections=1)
    clients = [
        httpx.AsyncClient(base_url=base_url, headers=headers, limits=single, timeout=60)
        for _ in range(concurrency)
    ]
    result = Load(name)

    async def loop(client: httpx.AsyncClient, until: float, record: bool) -> None:
        while (start := time.perf_counter()) < until:
            response = await send(client)
            if record:
                result.latencies.append(time.perf_counter() - start)
                result.errors += response.status_code >= 400

    try:
        await asyncio.gather(*(loop(client, time.perf_counter() + warmup, False) for client in clients))
        begin = time.perf_counter()
        await asyncio.gather(*(loop(client, begin + seconds, True) for client in clients))
        result.seconds = time.perf_counter() - begin
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    return result


def load(
    base_url: str, headers: Headers, name: str, send: Send, concurrency: int, seconds: float, warmup: float
) -> Load:
    result = asyncio.run(_load(base_url, headers, name, send, concurrency, seconds, warmup))
    print(f"  {name:<34} {result.rps:7.0f} req/s  p50 {result.percentile(50):6.1f} ms", flush=True)
    return result


def get(path: str) -> Send:
    return lambda client: client.get(path)


def post(path: str, body: dict[str, Any]) -> Send:
    return lambda client: client.post(path, json=body)


# --- Queue-to-running ----------------------------------------------------------------------------------


def training_file(tmp: Path) -> Path:
    path = tmp / "train.jsonl"
    with open(TRAIN_SOURCE, "rb") as source:
        path.write_bytes(b"".join(source.readline() for _ in range(12)))
    return path


def upload(client: httpx.Client, path: Path) -> str:
    with open(path, "rb") as source:
        response = client.post(
            "/v1/files", files={"file": (path.name, source)}, data={"purpose": "fine-tune"}
        )
    response.raise_for_status()
    return response.json()["id"]


def training_children(runner_pid: int) -> list[psutil.Process]:
    """The runner's training children (`ftjobs up` also keeps an inference server as its child)."""
    found = []
    for child in psutil.Process(runner_pid).children(recursive=True):
        try:
            if "worker.training" in child.cmdline():
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_idle(client: httpx.Client, job_id: str, runner_pid: int, data_dir: Path) -> None:
    """Until the runner is idle again: the job is finished, its training child is gone, and the runner has
    removed the attempt's work directory (the last thing it does), so the next sample finds it idle."""
    deadline = time.monotonic() + 120
    while True:
        status = client.get(f"{JOBS}/{job_id}").json()["status"]
        attempts = list((data_dir / "work" / job_id).glob("attempt-*"))
        if status in TERMINAL and not training_children(runner_pid) and not attempts:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not finish ({status})")
        time.sleep(0.05)
    time.sleep(0.2)  # the task or thread returning to its queue


def queue_to_running(
    base_url: str, headers: Headers, runner_pid: int, data_dir: Path, file_id: str, samples: int
) -> list[float]:
    """Seconds from POST returning to GET showing `running`; the first (cold runner) sample comes first."""
    body = {
        "model": MODEL,
        "training_file": file_id,
        "method": {"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
    }
    results = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        for _ in range(samples + 1):
            response = client.post(JOBS, json=body)
            returned = time.perf_counter()
            response.raise_for_status()
            job_id = response.json()["id"]
            while (job := client.get(f"{JOBS}/{job_id}").json())["status"] != "running":
                if job["status"] in TERMINAL or time.perf_counter() - returned > 60:
                    raise RuntimeError(f"job {job_id} never ran: {job['status']} {job['error']}")
                time.sleep(0.02)
            results.append(time.perf_counter() - returned)
            client.post(f"{JOBS}/{job_id}/cancel")  # a 400 means it already finished; fine either way
            wait_idle(client, job_id, runner_pid, data_dir)
    return results


def distributed_latency(args: argparse.Namespace, tmp: Path, model_dir: Path, train: Path) -> list[float]:
    """`cli api` + `cli worker` on a fresh Postgres database and a queue of their own."""
    queue = f"ftjobs-bench-{uuid.uuid4().hex[:8]}"
    with fresh_database(args.pg, "queue") as url:
        env = {
            "FTJOBS_DATA_DIR": str(tmp / "distributed"),
            "FTJOBS_DATABASE_URL": sqlalchemy_url(url),
            "FTJOBS_BROKER_URL": args.redis,
            "FTJOBS_WORKER_QUEUE": queue,
            # Quick cancels between samples; neither knob is on the path being measured.
            "FTJOBS_HEARTBEAT_SECONDS": "0.5",
            "FTJOBS_CANCEL_GRACE_SECONDS": "1",
        }
        cli(["models", "add", MODEL, str(model_dir)], env)
        headers = authorize(sqlalchemy_url(url))
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        worker_log, api_log = tmp / "worker.log", tmp / "api.log"
        api_args = [sys.executable, "-m", "cli", "api", "--host", "127.0.0.1", "--port", str(port)]
        try:
            with (
                process([sys.executable, "-m", "cli", "worker"], env, worker_log) as worker,
                process(api_args, env, api_log) as api,
            ):
                wait_until(
                    lambda: " ready." in worker_log.read_text(errors="replace"), worker, worker_log, "worker"
                )
                wait_until(healthy(base_url), api, api_log, "cli api")
                with httpx.Client(base_url=base_url, headers=headers) as client:
                    file_id = upload(client, train)
                return queue_to_running(
                    base_url, headers, worker.pid, Path(env["FTJOBS_DATA_DIR"]), file_id, args.samples
                )
        finally:
            delete_queue(args.redis, queue)


def embedded_latency(args: argparse.Namespace, tmp: Path, model_dir: Path, train: Path) -> list[float]:
    """`cli up`: SQLite and the in-process dispatcher."""
    env = {
        "FTJOBS_DATA_DIR": str(tmp / "embedded"),
        "FTJOBS_HEARTBEAT_SECONDS": "0.5",
        "FTJOBS_CANCEL_GRACE_SECONDS": "1",
    }
    cli(["models", "add", MODEL, str(model_dir)], env)
    headers = authorize(Settings(data_dir=Path(env["FTJOBS_DATA_DIR"])).resolved_database_url())
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = tmp / "up.log"
    with process([sys.executable, "-m", "cli", "up", "--port", str(port)], env, log) as up:
        wait_until(healthy(base_url), up, log, "cli up")
        with httpx.Client(base_url=base_url, headers=headers) as client:
            file_id = upload(client, train)
        return queue_to_running(
            base_url, headers, up.pid, Path(env["FTJOBS_DATA_DIR"]), file_id, args.samples
        )


# --- Throughput and list scaling -----------------------------------------------------------------------

FLOOR = "GET /bench/floor/{seq}  (floor)"
RETRIEVE = "GET /v1/fine_tuning/jobs/{id}"
LIST = "GET /v1/fine_tuning/jobs?limit=20"
CREATE = "POST /v1/fine_tuning/jobs"
LIST_SQL = "SELECT * FROM fine_tuning_job WHERE organization_id = %s ORDER BY seq DESC LIMIT 21"


@dataclass
class ListScale:
    rows: int
    load: Load
    plan: str
    db_ms: float
    """Postgres's own execution time for the page query: the part that could grow with the table."""


@dataclass
class ApiFigures:
    queue: str
    read_rows: int
    loads: dict[str, Load]
    small: ListScale
    large: ListScale


@contextmanager
def bench_server(args: argparse.Namespace, tmp: Path, name: str, env: dict[str, str]) -> Iterator[str]:
    """This file in `serve` mode (one uvicorn worker) on a free port; yields its base URL."""
    base_url = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, __file__, "serve", "--port", base_url.rsplit(":", 1)[1]]
    log = tmp / f"serve-{name}.log"
    with process(command + ["--access-log"] * args.access_log, env, log) as server:
        wait_until(healthy(base_url), server, log, f"bench server ({name})")
        yield base_url


def server_env(tmp: Path, name: str, url: str, args: argparse.Namespace, queue: str) -> dict[str, str]:
    return {
        "FTJOBS_DATA_DIR": str(tmp / name),
        "FTJOBS_DATABASE_URL": sqlalchemy_url(url),
        "FTJOBS_BROKER_URL": args.redis,
        "FTJOBS_WORKER_QUEUE": queue,
    }


def list_plan(url: str) -> tuple[str, float]:
    """The page query's plan (as the ORM sends it) and its best execution time of five."""
    with psycopg.connect(url) as conn:
        runs = [
            conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {LIST_SQL}", (ORG,)).fetchone() for _ in range(5)
        ]
    explained = [run[0][0] for run in runs if run]
    nodes, node = [], explained[0]["Plan"]
    while node:
        direction = " Backward" if node.get("Scan Direction") == "Backward" else ""
        index = f" ({node['Index Name']})" if "Index Name" in node else ""
        nodes.append(node["Node Type"] + direction + index)
        node = node.get("Plans", [None])[0]
    return " > ".join(nodes), min(run["Execution Time"] for run in explained)


def list_scaling(
    args: argparse.Namespace, tmp: Path, queue: str, large_url: str
) -> tuple[ListScale, ListScale]:
    """List p50 on a small database and on the large one, each behind a fresh server. One client, so it is
    the request's own latency; alternating rounds, so background noise falls on both sides alike."""
    with fresh_database(args.pg, "small") as small_url:
        bulk_insert_jobs(small_url, args.small_jobs, seed=1)
        urls = (small_url, large_url)
        with (
            bench_server(args, tmp, "small", server_env(tmp, "small", small_url, args, queue)) as small_base,
            bench_server(args, tmp, "large", server_env(tmp, "large", large_url, args, queue)) as large_base,
        ):
            totals = [Load(f"list, {count_jobs(url):,} jobs, 1 client") for url in urls]
            keys = [authorize(sqlalchemy_url(url)) for url in urls]
            for _ in range(args.rounds):
                for total, base_url, headers in zip(totals, (small_base, large_base), keys, strict=True):
                    total.add(load(base_url, headers, total.name, get(f"{JOBS}?limit=20"), 1, 2, 0.5))
        small, large = (
            ListScale(count_jobs(url), total, *list_plan(url))
            for url, total in zip(urls, totals, strict=True)
        )
    return small, large


def measure(
    base_url: str, headers: Headers, endpoints: dict[str, Send], args: argparse.Namespace
) -> dict[str, Load]:
    """Each endpoint in `--rounds` short interleaved rounds, so background noise spreads over all of them.
    Rounds after the first only need to reopen connections, so their warm-up is short."""
    totals = {name: Load(name) for name in endpoints}
    for round_ in range(args.rounds):
        warmup = args.warmup if round_ == 0 else min(args.warmup, 0.5)
        for name, send in endpoints.items():
            totals[name].add(load(base_url, headers, name, send, args.concurrency, args.seconds, warmup))
    return totals


def api_figures(args: argparse.Namespace, tmp: Path, model_dir: Path, train: Path) -> ApiFigures:
    queue = f"ftjobs-bench-{uuid.uuid4().hex[:8]}"
    try:
        with fresh_database(args.pg, "api") as url:
            env = server_env(tmp, "api", url, args, queue)
            cli(["models", "add", MODEL, str(model_dir)], env)
            bulk_insert_jobs(url, args.small_jobs, seed=1)
            headers = authorize(sqlalchemy_url(url))
            with bench_server(args, tmp, "api", env) as base_url:
                with httpx.Client(base_url=base_url, headers=headers) as client:
                    body = {
                        "model": MODEL,
                        "training_file": upload(client, train),
                        "suffix": "bench",
                        "method": {"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
                    }
                    job_id = client.post(JOBS, json=body).raise_for_status().json()["id"]
                with psycopg.connect(url) as conn:
                    row = conn.execute("SELECT seq FROM fine_tuning_job WHERE id = %s", (job_id,)).fetchone()
                assert row is not None
                read_rows = count_jobs(url)
                print(f"Concurrency {args.concurrency}, {args.rounds} x {args.seconds:g} s each:", flush=True)
                reads = {
                    FLOOR: get(f"/bench/floor/{row[0]}"),
                    RETRIEVE: get(f"{JOBS}/{job_id}"),
                    LIST: get(f"{JOBS}?limit=20"),
                }
                loads = measure(base_url, headers, reads, args)
                loads |= measure(base_url, headers, {CREATE: post(JOBS, body)}, args)
            bulk_insert_jobs(url, max(0, args.large_jobs - count_jobs(url)), seed=2)
            print("List scaling, one client, alternating databases:", flush=True)
            small, large = list_scaling(args, tmp, queue, url)
    finally:
        delete_queue(args.redis, queue)
    return ApiFigures(queue, read_rows, loads, small, large)


# --- Report --------------------------------------------------------------------------------------------


def machine_facts(pg_admin: str) -> str:
    with psycopg.connect(pg_admin) as conn:
        postgres = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, PostgreSQL {postgres}, "
        f"uvicorn {uvicorn.__version__} (h11, asyncio loop, 1 worker), httpx {httpx.__version__} client; "
        f"1-min load average at start {os.getloadavg()[0]:.2f}"  # other work on the box skews every figure
    )


def report(
    facts: str,
    background: str,
    api: ApiFigures,
    distributed: list[float],
    embedded: list[float],
    args: argparse.Namespace,
) -> None:
    ratio = api.loads[RETRIEVE].rps / api.loads[FLOOR].rps
    list_ratio = api.large.load.percentile(50) / api.small.load.percentile(50)
    line = "=" * 100
    print(f"\n{line}\nMachine: {facts}\n{background}")
    print(f"Create dispatcher: Celery on Redis, queue {api.queue!r} with no consumer (deleted at the end)")
    print(
        f"Load: {args.concurrency} in flight, {args.rounds} interleaved rounds x {args.seconds:g} s per "
        f"endpoint (warm-up {args.warmup:g} s, then 0.5 s); {api.read_rows:,} jobs in the table\n"
    )
    print(f"{'endpoint':<40}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, item in api.loads.items():
        print(
            f"{name:<40}{item.rps:>8.0f}{item.percentile(50):>9.1f}{item.percentile(99):>9.1f}{item.errors:>8}"
        )
    print(f"\n{'list, one client':<18}{'p50 ms':>8}{'p99 ms':>8}{'SQL ms':>8}  plan")
    for scale in (api.small, api.large):
        print(
            f"{scale.rows:>12,} jobs{scale.load.percentile(50):>8.2f}{scale.load.percentile(99):>8.2f}"
            f"{scale.db_ms:>8.3f}  {scale.plan}"
        )
    print("\nqueue -> running (first sample: cold runner, not counted; then the samples counted)")
    for name, samples in (("distributed", distributed), ("embedded", embedded)):
        counted = ", ".join(f"{x * 1000:.0f}" for x in samples[1:])
        print(f"  {name:<12} first {samples[0] * 1000:.0f} ms; samples {counted} ms")
    targets = [
        ("retrieve / floor throughput", f"{ratio:.2f}", ">= 0.70", ratio >= 0.7),
        ("list p50, 100k / 1k jobs", f"{list_ratio:.2f}", "<= 1.30", list_ratio <= 1.3),
    ]
    for name, samples in (("distributed", distributed), ("embedded", embedded)):
        median, worst = statistics.median(samples[1:]), max(samples[1:])
        targets.append(
            (f"queue -> running, {name}", f"median {median:.3f} s, max {worst:.3f} s", "<= 2 s", worst <= 2.0)
        )
    print(f"\n{'figure':<32}{'value':<34}{'target':<10}result")
    for name, value, target, ok in targets:
        print(f"{name:<32}{value:<34}{target:<10}{'PASS' if ok else 'FAIL'}")
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", choices=["run", "serve"], default="run", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per endpoint and round")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before the first round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per endpoint")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--samples", type=int, default=5, help="queue-to-running samples per deployment")
    parser.add_argument("--small-jobs", type=int, default=1_000, help="jobs in the table, small case")
    parser.add_argument("--large-jobs", type=int, default=100_000, help="jobs in the table, large case")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Celery broker")
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="serve at log level info with access lines, as `ftjobs api` does",
    )
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.port, args.access_log)
        return

    from tests.tiny_model import build_tiny_llama  # torch: only this process, never the server

    started = time.monotonic()
    facts = machine_facts(args.pg)
    print(f"Machine: {facts}", flush=True)
    with (
        OtherLoad(excluded=("postgres", "redis")) as other,
        tempfile.TemporaryDirectory(prefix="ftjobs-bench-") as name,
    ):
        tmp = Path(name)
        model_dir = build_tiny_llama(tmp / "tiny-llama")
        train = training_file(tmp)
        api = api_figures(args, tmp, model_dir, train)
        print("Queue to running: distributed (cli api + cli worker), then embedded (cli up)...", flush=True)
        distributed = distributed_latency(args, tmp, model_dir, train)
        embedded = embedded_latency(args, tmp, model_dir, train)
    elapsed = time.monotonic() - started
    share = other.seconds / (elapsed * (os.cpu_count() or 1))
    background = (
        f"Other processes (not this bench, Postgres or Redis) used {other.seconds:.0f} CPU-s during the "
        f"{elapsed:.0f} s run: {share:.0%} of the machine"
    )
    report(facts, background, api, distributed, embedded, args)


if __name__ == "__main__":
    main()
