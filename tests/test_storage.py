"""The artifact store's contract, on the local directory and on a real S3 server (SeaweedFS): round trips
with sha256, streaming reads, directories published whole or not at all, prefix deletes, and the node
cache behind `local_path` (hits, refetches, LRU eviction, concurrent fills); the sweep; the start-up check;
and one tiny job whose artifacts all live in SeaweedFS."""

import hashlib
import io
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from models.base_store import local_base, register_base
from models.db import session_scope
from models.registry import content_hash
from models.settings import Settings
from models.storage import PARTIAL, ArtifactStore, LocalArtifactStore, StoreUnavailable, Swept, open_store
from models.storage_s3 import MANIFEST, PUBLISHING, S3ArtifactStore
from tests.conftest import RecordingDispatcher, S3Server, s3_settings
from tests.jobs_helpers import chat_lines
from worker.reconciler import Reconciler
from worker.runner import JobRunner


class OneWayStream:
    """A source that can only be read forward, as a request body is."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._data.read(size)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    return open_store(s3_settings(request.getfixturevalue("s3_env"), tmp_path))


@pytest.fixture
def s3_store(s3_env: S3Server, tmp_path: Path) -> S3ArtifactStore:
    store = open_store(s3_settings(s3_env, tmp_path, cache_max_bytes=2500))
    assert isinstance(store, S3ArtifactStore)
    return store


class Downloads:
    """Counts the GetObject requests a store's client sends (a cache hit sends none)."""

    def __init__(self, store: ArtifactStore) -> None:
        self.count = 0
        self._lock = threading.Lock()
        if isinstance(store, S3ArtifactStore):
            store.client.meta.events.register("before-call.s3.GetObject", self._seen)

    def _seen(self, **_: Any) -> None:
        with self._lock:
            self.count += 1


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_dir(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def read_dir(path: Path) -> dict[str, bytes]:
    return {
        file.relative_to(path).as_posix(): file.read_bytes() for file in path.rglob("*") if file.is_file()
    }


ADAPTER = {"adapter_config.json": b'{"r": 8}', "weights/adapter.safetensors": os.urandom(3000)}


def test_round_trip_with_sha256(store: ArtifactStore) -> None:
    data = os.urandom(9 * 1024 * 1024 + 17)  # past boto3's 8 MiB multipart threshold
    assert store.put_stream("files/big", OneWayStream(data)) == (len(data), sha256(data))
    assert store.size("files/big") == len(data)
    with store.open("files/big") as stream:
        assert sha256(stream.read()) == sha256(data)
    assert store.put_stream("files/empty", io.BytesIO(b"")) == (0, sha256(b""))
    assert store.local_path("files/empty").read_bytes() == b""


def test_open_streams_line_by_line(store: ArtifactStore) -> None:
    lines = [b'{"n": %d}\n' % n for n in range(5000)]
    store.put_stream("files/lines", io.BytesIO(b"".join(lines)))
    with store.open("files/lines") as stream:
        assert stream.readline() == lines[0]
        assert stream.read(len(lines[1])) == lines[1]
        assert list(iter(stream.readline, b"")) == lines[2:]
    with pytest.raises(FileNotFoundError):
        store.open("files/missing")
    with pytest.raises(FileNotFoundError):
        store.size("files/missing")
    assert not store.local_path("files/missing").exists()


def test_put_dir_is_invisible_until_complete(store: ArtifactStore, tmp_path: Path) -> None:
    source = make_dir(tmp_path / "adapter", ADAPTER)
    (source / "zz-broken").symlink_to(tmp_path / "nowhere")  # the last file to publish cannot be read
    with pytest.raises(OSError):
        store.put_dir("jobs/j/adapter", source)
    assert not store.local_path("jobs/j/adapter").exists()
    if isinstance(store, S3ArtifactStore):  # its files were uploaded, but no manifest names them
        names = [name for name, _ in store._list("jobs/j/adapter/")]
        assert "jobs/j/adapter/adapter_config.json" in names and f"jobs/j/adapter/{MANIFEST}" not in names

    (source / "zz-broken").unlink()
    store.put_dir("jobs/j/adapter", source)
    assert read_dir(store.local_path("jobs/j/adapter")) == ADAPTER
    with store.open("jobs/j/adapter/adapter_config.json") as stream:  # as lineage is read
        assert stream.read() == ADAPTER["adapter_config.json"]
    store.put_dir("jobs/j/adapter", source)  # a retried publication of the same files is a no-op
    assert read_dir(store.local_path("jobs/j/adapter")) == ADAPTER


def test_delete_removes_a_prefix_and_nothing_beside_it(store: ArtifactStore, tmp_path: Path) -> None:
    store.put_dir("jobs/j/ckpt", make_dir(tmp_path / "ckpt", ADAPTER))
    store.put_dir("jobs/j/ckpt-2", make_dir(tmp_path / "ckpt-2", {"a": b"kept"}))
    store.put_stream("jobs/j/ckpt.log", io.BytesIO(b"kept too"))
    store.delete("jobs/j/ckpt")
    assert not store.local_path("jobs/j/ckpt").exists()
    with pytest.raises(FileNotFoundError):
        store.open("jobs/j/ckpt/adapter_config.json")
    assert read_dir(store.local_path("jobs/j/ckpt-2")) == {"a": b"kept"}
    assert store.local_path("jobs/j/ckpt.log").read_bytes() == b"kept too"
    store.delete("jobs/j/ckpt.log")
    store.delete("jobs/j/never-written")
    with pytest.raises(FileNotFoundError):
        store.open("jobs/j/ckpt.log")


def test_local_path_is_fetched_once(store: ArtifactStore, tmp_path: Path) -> None:
    store.put_stream("files/train", io.BytesIO(b'{"a": 1}\n'))
    store.put_dir("jobs/j/adapter", make_dir(tmp_path / "adapter", ADAPTER))
    first, first_dir = store.local_path("files/train"), store.local_path("jobs/j/adapter")
    downloads = Downloads(store)
    assert store.local_path("files/train") == first and first.read_bytes() == b'{"a": 1}\n'
    assert store.local_path("jobs/j/adapter") == first_dir and read_dir(first_dir) == ADAPTER
    assert downloads.count == 0


def test_local_path_follows_a_changed_object(store: ArtifactStore, tmp_path: Path) -> None:
    store.put_stream("files/f", io.BytesIO(b"first"))
    assert store.local_path("files/f").read_bytes() == b"first"
    store.put_stream("files/f", io.BytesIO(b"second"))
    assert store.local_path("files/f").read_bytes() == b"second"
    store.put_dir("jobs/j/merged", make_dir(tmp_path / "one", {"w": b"1"}))
    assert read_dir(store.local_path("jobs/j/merged")) == {"w": b"1"}
    store.delete("jobs/j/merged")
    store.put_dir("jobs/j/merged", make_dir(tmp_path / "two", {"w": b"2", "x": b"3"}))
    assert read_dir(store.local_path("jobs/j/merged")) == {"w": b"2", "x": b"3"}


def test_concurrent_local_path_fills_once(store: ArtifactStore, tmp_path: Path) -> None:
    files = {f"shard-{n}.bin": os.urandom(200_000) for n in range(4)}
    store.put_dir("jobs/j/checkpoint", make_dir(tmp_path / "checkpoint", files))
    downloads = Downloads(store)
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: store.local_path("jobs/j/checkpoint"), range(8)))
    assert len(set(paths)) == 1 and read_dir(paths[0]) == files
    if isinstance(store, S3ArtifactStore):
        assert downloads.count == 1 + len(files)  # the manifest and each file, once


def test_cache_evicts_the_least_recently_used(s3_store: S3ArtifactStore) -> None:
    for name in "abc":
        s3_store.put_stream(f"files/{name}", io.BytesIO(name.encode() * 1000))
    a, b = s3_store.local_path("files/a"), s3_store.local_path("files/b")
    time.sleep(0.01)
    assert s3_store.local_path("files/a") == a  # a is now used more recently than b
    c = s3_store.local_path("files/c")  # 3000 bytes cached, over the 2500 bound: b goes
    assert a.exists() and c.exists() and not b.exists()
    downloads = Downloads(s3_store)
    assert s3_store.local_path("files/b").read_bytes() == b"b" * 1000
    assert downloads.count == 1


def test_a_published_prefix_is_not_replaced(s3_store: S3ArtifactStore, tmp_path: Path) -> None:
    s3_store.put_dir("jobs/j/adapter", make_dir(tmp_path / "one", {"w": b"1"}))
    with pytest.raises(FileExistsError):
        s3_store.put_dir("jobs/j/adapter", make_dir(tmp_path / "two", {"w": b"2"}))
    assert read_dir(s3_store.local_path("jobs/j/adapter")) == {"w": b"1"}


def test_sweep_removes_what_crashes_leave(s3_store: S3ArtifactStore, tmp_path: Path) -> None:
    source = make_dir(tmp_path / "adapter", ADAPTER)
    s3_store.put_dir("jobs/j/published", source)
    s3_store.put_stream("files/kept", io.BytesIO(b"kept"))
    (source / "zz-broken").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OSError):
        s3_store.put_dir("jobs/j/half", source)  # files uploaded, no manifest
    s3_store._put(f"jobs/j/published/{PUBLISHING}", b"")  # a publisher died before removing its marker
    upload = s3_store.client.create_multipart_upload(Bucket=s3_store.bucket, Key=s3_store._key("files/x"))
    s3_store._put("files/dropped/part", b"x")
    s3_store._put("files/dropped/.deleting", b"")  # a delete that died half way

    young = s3_store.sweep(older_than=3600)
    assert (young.prefixes, young.uploads) == ([], 0)
    time.sleep(1.1)  # S3 times have one-second resolution
    swept = s3_store.sweep(older_than=0)
    assert sorted(swept.prefixes) == ["files/dropped", "jobs/j/half"] and swept.uploads == 1
    names = {name for name, _ in s3_store._list("")}
    assert names == {
        "files/kept",
        f"jobs/j/published/{MANIFEST}",
        *(f"jobs/j/published/{n}" for n in ADAPTER),
    }
    uploads = s3_store.client.list_multipart_uploads(Bucket=s3_store.bucket, Prefix=s3_store.root)
    assert upload["UploadId"] not in [u["UploadId"] for u in uploads.get("Uploads", [])]
    assert read_dir(s3_store.local_path("jobs/j/published")) == ADAPTER


def test_local_sweep_removes_half_written_leftovers(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    store.put_stream("files/kept", io.BytesIO(b"kept"))
    make_dir(tmp_path / "artifacts" / "jobs" / "j" / f"adapter{PARTIAL}", ADAPTER)  # a copy that died
    (tmp_path / "artifacts" / "files" / f"upload{PARTIAL}").write_bytes(b"half")
    assert store.sweep(older_than=3600) == Swept(prefixes=[], uploads=0)
    time.sleep(0.01)
    swept = store.sweep(older_than=0)
    assert swept.prefixes == [f"files/upload{PARTIAL}", f"jobs/j/adapter{PARTIAL}"]
    assert read_dir(tmp_path / "artifacts") == {"files/kept": b"kept"}


def test_the_reconciler_sweeps_the_store_on_schedule(
    settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    store = open_store(settings)
    assert isinstance(store, S3ArtifactStore)
    source = make_dir(tmp_path / "adapter", ADAPTER)
    (source / "zz-broken").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OSError):
        store.put_dir("jobs/j/half", source)  # files uploaded, no manifest
    upload = store.client.create_multipart_upload(Bucket=store.bucket, Key=store._key("files/x"))
    time.sleep(1.1)  # S3 times have one-second resolution
    every_hour = settings.model_copy(update={"store_orphan_seconds": 0.0, "store_sweep_seconds": 3600.0})
    reconciler = Reconciler(every_hour, session_factory, RecordingDispatcher(), store)
    assert reconciler.sweep_store() == Swept(prefixes=["jobs/j/half"], uploads=1)  # at the first tick
    assert [name for name, _ in store._list("")] == []
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.root).get("Uploads", [])
    assert upload["UploadId"] not in [u["UploadId"] for u in uploads]
    store._put("jobs/k/.publishing", b"")
    assert reconciler.sweep_store() is None  # not due for another hour
    assert [name for name, _ in store._list("")] == ["jobs/k/.publishing"]


def test_readyz_probes_the_bucket(settings: Settings, s3_env: S3Server) -> None:
    admin = boto3.client("s3", endpoint_url=s3_env.endpoint_url)
    bucket = f"readyz-{uuid.uuid4().hex[:8]}"
    admin.create_bucket(Bucket=bucket)
    own_bucket = settings.model_copy(update={"storage_url": f"s3://{bucket}/p"})
    with TestClient(create_app(own_bucket, RecordingDispatcher())) as client:
        ready = client.get("/readyz")
        admin.delete_bucket(Bucket=bucket)  # the store breaks while the API runs
        broken = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["storage"] == {"status": "ok", "detail": None}
    storage = broken.json()["checks"]["storage"]
    assert broken.status_code == 503 and storage["status"] == "error" and "404" in storage["detail"]
    assert broken.json()["checks"]["database"]["status"] == "ok"


@pytest.mark.parametrize(
    ("bucket", "secret", "says"),
    [("no-such-bucket", None, "does not exist"), (None, "wrong-secret", "refused these credentials")],
)
def test_store_that_cannot_be_used_refuses_start(
    s3_env: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bucket: str | None,
    secret: str | None,
    says: str,
) -> None:
    settings = s3_settings(s3_env, tmp_path)
    if bucket:
        settings = settings.model_copy(update={"storage_url": f"s3://{bucket}/p"})
    if secret:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(StoreUnavailable, match=says):
        open_store(settings)


@pytest.mark.parametrize(
    ("command", "bucket", "secret", "says"),
    [
        ("worker", "no-such-bucket", None, "bucket 'no-such-bucket' at {url} does not exist"),
        ("api", None, "wrong-secret", "bucket '{bucket}' at {url} refused these credentials"),
        ("serve", "no-such-bucket", None, "bucket 'no-such-bucket' at {url} does not exist"),
        ("up", None, "wrong-secret", "bucket '{bucket}' at {url} refused these credentials"),
    ],
)
def test_every_server_refuses_to_start_on_a_store_it_cannot_use(
    s3_env: S3Server, tmp_path: Path, command: str, bucket: str | None, secret: str | None, says: str
) -> None:
    env = {
        **os.environ,
        "FTJOBS_DATA_DIR": str(tmp_path / "data"),
        "FTJOBS_STORAGE_URL": f"s3://{bucket or s3_env.bucket}/ftjobs",
        "FTJOBS_S3_ENDPOINT_URL": s3_env.endpoint_url,
        "AWS_SECRET_ACCESS_KEY": secret or s3_env.secret_key,
    }
    result = subprocess.run(
        [sys.executable, "-m", "cli", command], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    line = says.format(url=s3_env.endpoint_url, bucket=s3_env.bucket)
    assert result.stderr.strip().splitlines() == [f"error: artifact store: {line}"]


def test_no_storage_url_is_the_local_directory(tmp_path: Path) -> None:
    store = open_store(Settings(data_dir=tmp_path / "data"))
    assert isinstance(store, LocalArtifactStore) and store.root == (tmp_path / "data" / "artifacts").resolve()


@pytest.fixture
def settings(s3_env: S3Server, tmp_path: Path, database_url: str) -> Settings:
    """The suite's settings with artifacts in object storage (the `client` and runner then use it)."""
    return s3_settings(s3_env, tmp_path, database_url=database_url, heartbeat_seconds=0.5)


def test_a_base_registered_on_one_machine_is_fetched_on_another(
    settings: Settings, session_factory: sessionmaker[Session], tiny_model_dir: Path, tmp_path: Path
) -> None:
    source = shutil.copytree(tiny_model_dir, tmp_path / "machine-a" / "tiny")
    with session_scope(session_factory) as session:
        entry = register_base(session, open_store(settings), "tiny", source, "local")
        registered = (entry.path, entry.content_hash)
    shutil.rmtree(source)  # nothing on machine A's disk is left to share
    machine_b = open_store(settings.model_copy(update={"data_dir": tmp_path / "machine-b"}))
    path = Path(local_base(machine_b, *registered))
    assert path.is_relative_to(tmp_path / "machine-b" / "cache")
    assert read_dir(path) == read_dir(tiny_model_dir) and content_hash(path) == registered[1]
    assert local_base(LocalArtifactStore(tmp_path / "local"), *registered) == registered[0]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the store is all that differs here
def test_a_job_runs_with_its_artifacts_in_object_storage(
    client: TestClient, settings: Settings, session_factory: sessionmaker[Session], registered_model: str
) -> None:
    files = client.app.state.store  # pyright: ignore[reportAttributeAccessIssue]
    assert isinstance(files, S3ArtifactStore)
    ids = {}
    for split, lines in (("training_file", chat_lines(12)), ("validation_file", chat_lines(4, "validation"))):
        upload = {"file": ("data.jsonl", io.BytesIO(lines))}
        ids[split] = client.post("/v1/files", files=upload, data={"purpose": "fine-tune"}).json()["id"]
    body = {"model": registered_model, **ids, "method": {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 1, "batch_size": 4, "max_seq_length": 512}}}}  # fmt: skip
    job_id = client.post("/v1/fine_tuning/jobs", json=body).json()["id"]

    JobRunner(settings, session_factory, open_store(settings)).run(job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    names = {name for name, _ in files._list("")}
    for key in (f"jobs/{job_id}/attempt-1/adapter", f"jobs/{job_id}/attempt-1/checkpoints/step-3"):
        assert f"{key}/{MANIFEST}" in names and f"{key}/{PUBLISHING}" not in names
    assert not settings.artifacts_root.exists()  # nothing went to the local directory
    results = client.get(f"/v1/files/{job['result_files'][0]}/content")
    assert results.status_code == 200 and results.text.startswith("step,")
