"""Shared fixtures: real Postgres, Redis and SeaweedFS (fail under CI=true when missing), SQLite, the app."""

import os
import shutil
import subprocess

# Tiny models run fastest on one thread: two OpenMP threads spin against each other (and against the
# training children, which inherit this) on a 2-core machine. Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from models.auth import ApiKeys, Organizations
from models.db import Base, make_engine, make_session_factory, session_scope
from models.migrate import upgrade
from models.registry import ModelRegistry
from models.settings import Settings
from tests.seaweedfs import S3Server, SeaweedFSUnavailable, seaweedfs
from tests.tiny_model import build_tiny_llama

PG_ADMIN = os.environ.get("FTJOBS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("FTJOBS_TEST_REDIS", "redis://127.0.0.1:6379/9")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _unavailable(what: str, error: Exception) -> None:
    message = f"{what} is not reachable: {error}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, migrated database on the real Postgres server, dropped afterwards."""
    name = f"ftjobs_test_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        _unavailable("PostgreSQL", error)
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    upgrade(url)
    try:
        yield url
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as error:
        _unavailable("Redis", error)
    client.flushdb()
    return REDIS_URL


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test that asks for it runs twice: on Postgres (distributed) and SQLite (embedded)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ftjobs.db'}"
        upgrade(url)
        yield url
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    engine = make_engine(url)
    with engine.begin() as conn:
        tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url, heartbeat_seconds=0.5)


@pytest.fixture
def session_factory(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.resolved_database_url())
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def registered_model(session_factory: sessionmaker[Session], tiny_model_dir: Path) -> str:
    with session_scope(session_factory) as session:
        ModelRegistry(session).register("tiny-llama", str(tiny_model_dir), "local")
    return "tiny-llama"


class RecordingDispatcher:
    """Records wake-ups so API tests can check they happen only for committed jobs."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(self, job_id: str, device_class: str | None = None) -> None:
        self.submitted.append(job_id)


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


@dataclass(frozen=True)
class Tenant:
    """An organisation and one of its API keys."""

    id: str
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_tenant(factory: sessionmaker[Session], name: str) -> Tenant:
    with session_scope(factory) as session:
        organization = Organizations(session).named(name)
        _, key = ApiKeys(session).create(organization, "tests")
        return Tenant(organization.id, organization.name, key)


@pytest.fixture
def tenant(session_factory: sessionmaker[Session]) -> Tenant:
    """The organisation `client` calls as."""
    return make_tenant(session_factory, "local")


@pytest.fixture
def client(settings: Settings, dispatcher: RecordingDispatcher, tenant: Tenant) -> Iterator[TestClient]:
    app = create_app(settings, dispatcher)
    with TestClient(app, raise_server_exceptions=False, headers=tenant.headers) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS, a real S3-compatible server, for the object store's tests: one per test session."""
    try:
        with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
            yield server
    except SeaweedFSUnavailable as error:
        _unavailable("SeaweedFS", error)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Credentials where boto3 looks for them, as a deployment sets them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


def s3_settings(server: S3Server, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a store under a prefix of its own in the shared test bucket."""
    defaults = {
        "data_dir": tmp_path / "data",
        "storage_url": f"s3://{server.bucket}/test-{uuid.uuid4().hex[:12]}",
        "s3_endpoint_url": server.endpoint_url,
    }
    return Settings(**(defaults | overrides))


@pytest.fixture(scope="session")
def slurm_conf() -> str:
    """A real one-machine Slurm cluster (tests/slurm/cluster.sh: munged, slurmctld and two slurmd nodes),
    the one `.ci/run` started (SLURM_CONF names its config) or one started now; it stays up afterwards,
    like Postgres (`tests/slurm/cluster.sh stop` ends it). Returns the path of its slurm.conf."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        _unavailable("Slurm", FileNotFoundError("no sbatch/slurmctld (apt-get install slurm-wlm munge)"))
    conf = Path(os.environ.get("SLURM_CONF") or "/tmp/ftjobs-slurm/slurm.conf")
    script = Path(__file__).parent / "slurm" / "cluster.sh"
    started = subprocess.run([script, "start", conf.parent], capture_output=True, text=True, check=False)
    if started.returncode != 0:
        _unavailable("Slurm", RuntimeError(started.stderr[-2000:]))
    os.environ["SLURM_CONF"] = str(conf)  # for sbatch, squeue and scancel, here and in the allocations
    return str(conf)
