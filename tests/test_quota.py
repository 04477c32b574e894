"""Storage quota per organisation (security finding 5), on Postgres and SQLite: uploads and jobs' artifacts
count against a limit the admin sets, concurrent writers can't both take the last bytes, deletions free
them, and uploads are spooled inside the data directory, never the system temp directory."""

import io
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from api.main import create_app
from cli.main import app as cli_app
from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.conftest import RecordingDispatcher, Tenant, make_tenant
from tests.e2e.servers import create_key, distributed_env, free_port, process
from tests.jobs_helpers import chat_lines, wait_for
from tests.test_api_files import LINE, assert_error
from tests.test_runner import create_job
from worker.runner import JobRunner

ADMIN = "sk-ftjadmin-quota-test-admin-key"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
CONTENT = LINE.encode() * 8000  # about 300 KB


@pytest.fixture
def client(settings: Settings, tenant: Tenant) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"admin_key": SecretStr(ADMIN)}), RecordingDispatcher())
    with TestClient(app, raise_server_exceptions=False, headers=tenant.headers) as test_client:
        yield test_client


def organization(client: TestClient, tenant: Tenant) -> dict[str, Any]:
    response = client.get(f"/v1/admin/organizations/{tenant.id}", headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    return response.json()


def set_quota(client: TestClient, tenant: Tenant, quota: int | None) -> dict[str, Any]:
    path = f"/v1/admin/organizations/{tenant.id}"
    response = client.post(path, json={"storage_quota_bytes": quota}, headers=ADMIN_HEADERS)
    assert response.status_code == 200, response.text
    return response.json()


def upload(client: TestClient, headers: dict[str, str] | None = None) -> httpx.Response:
    """An upload of CONTENT; `headers`: another organisation's key than the client's."""
    files = {"file": ("train.jsonl", io.BytesIO(CONTENT))}
    return client.post("/v1/files", files=files, data={"purpose": "fine-tune"}, headers=headers)


def stored_bytes(settings: Settings) -> int:
    """What the artifact store holds, jobs' logs aside (they are the service's, not the organisation's)."""
    paths = (path for path in settings.artifacts_root.rglob("*") if path.is_file())
    return sum(path.stat().st_size for path in paths if path.name != "train.log")


def test_concurrent_uploads_stop_at_the_quota_and_deleting_frees_it(
    client: TestClient, settings: Settings, tenant: Tenant
) -> None:
    """The finding's reproduction: six concurrent uploads from one key were all stored. With room for three
    and a half, three are stored, three get a 413 (not a 429, which the SDKs would retry), and nothing of
    the refused ones is left behind."""
    set_quota(client, tenant, 3 * len(CONTENT) + len(CONTENT) // 2)
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: upload(client), range(6)))
    stored = [response for response in responses if response.status_code == 200]
    assert len(stored) == 3, [response.text for response in responses]
    for refused in (response for response in responses if response.status_code != 200):
        error = assert_error(refused, 413, "file", "storage_quota_exceeded")
        assert "storage quota" in error["message"]
    used = 3 * len(CONTENT)
    assert organization(client, tenant)["storage_used_bytes"] == used == stored_bytes(settings)
    assert not any((settings.data_dir / "tmp").iterdir())

    assert client.delete(f"/v1/files/{stored[0].json()['id']}").status_code == 200
    assert organization(client, tenant)["storage_used_bytes"] == 2 * len(CONTENT)
    assert upload(client).status_code == 200


def test_an_upload_that_cannot_fit_is_refused_before_its_body_is_read(
    client: TestClient, settings: Settings, tenant: Tenant
) -> None:
    set_quota(client, tenant, 100_000)
    read = []

    def body() -> Iterator[bytes]:
        read.append(1)
        yield b"--x\r\n"

    headers = {"content-type": "multipart/form-data; boundary=x", "content-length": "1000000"}
    response = client.post("/v1/files", content=body(), headers=headers)
    assert_error(response, 413, "file", "storage_quota_exceeded")
    assert read == []


def test_a_streamed_upload_stops_when_it_crosses_the_quota(
    client: TestClient, settings: Settings, tenant: Tenant
) -> None:
    """Without Content-Length the body is read until the file no longer fits, then the spooled part is
    discarded; an upload that fits exactly is stored."""
    set_quota(client, tenant, len(CONTENT))

    def body() -> Iterator[bytes]:
        yield b'--x\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        for _ in range(100):
            yield CONTENT[:65536]
        yield b"\r\n--x--\r\n"

    response = client.post(
        "/v1/files", content=body(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert_error(response, 413, "file", "storage_quota_exceeded")
    assert stored_bytes(settings) == 0 and client.get("/v1/files").json()["data"] == []
    assert not any((settings.data_dir / "tmp").iterdir())
    assert upload(client).status_code == 200


def test_the_admin_sets_and_sees_each_organisations_quota(
    client: TestClient, settings: Settings, session_factory: sessionmaker[Session], tenant: Tenant
) -> None:
    other = make_tenant(session_factory, "other")
    default = settings.storage_quota_bytes
    assert organization(client, tenant) | {"created_at": 0} == {
        "id": tenant.id,
        "object": "organization",
        "name": tenant.name,
        "created_at": 0,
        "storage_quota_bytes": None,
        "storage_limit_bytes": default,
        "storage_used_bytes": 0,
        "share_weight": 1.0,
        "device_caps": None,
        "monthly_device_hours": None,
        "device_hours_this_month": 0.0,
    }
    assert upload(client).status_code == 200
    limited = set_quota(client, tenant, len(CONTENT))
    assert (limited["storage_quota_bytes"], limited["storage_limit_bytes"]) == (len(CONTENT), len(CONTENT))
    assert limited["storage_used_bytes"] == len(CONTENT)
    assert_error(upload(client), 413, "file", "storage_quota_exceeded")
    # Each organisation has its own: the other's uploads still fit under the default.
    assert upload(client, other.headers).status_code == 200
    listed = client.get("/v1/admin/organizations", headers=ADMIN_HEADERS).json()["data"]
    assert {org["name"]: org["storage_used_bytes"] for org in listed} == {
        tenant.name: len(CONTENT),
        other.name: len(CONTENT),
    }

    assert set_quota(client, tenant, 0)["storage_limit_bytes"] == 0  # no limit
    assert upload(client).status_code == 200
    assert set_quota(client, tenant, None)["storage_limit_bytes"] == default
    path = f"/v1/admin/organizations/{tenant.id}"
    for bad in ({}, {"storage_quota_bytes": -1}, {"storage_quota_bytes": "lots"}):
        assert_error(client.post(path, json=bad, headers=ADMIN_HEADERS), 400, "storage_quota_bytes")
    missing = client.post(
        "/v1/admin/organizations/org-nope", json={"storage_quota_bytes": 1}, headers=ADMIN_HEADERS
    )
    assert_error(missing, 404, "organization_id")
    assert_error(client.post(path, json={"storage_quota_bytes": 0}), 403, code="permission_denied")


def test_a_job_whose_model_does_not_fit_fails_and_publishes_nothing(
    client: TestClient,
    settings: Settings,
    session_factory: sessionmaker[Session],
    registered_model: str,
    tenant: Tenant,
) -> None:
    """Published artifacts count (adapter, checkpoints, results file), so usage is what the store holds;
    a job that would publish over the quota fails with a clear error and leaves no model; deleting
    models frees their bytes."""
    runner = JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root))
    fits = create_job(client, registered_model, chat_lines(12))
    runner.run(fits)
    job = client.get(f"/v1/fine_tuning/jobs/{fits}").json()
    assert job["status"] == "succeeded", job["error"]
    used = organization(client, tenant)["storage_used_bytes"]
    assert used == stored_bytes(settings) > len(chat_lines(12)) + 10_000  # the adapter and checkpoints count

    set_quota(
        client, tenant, used + len(chat_lines(12)) + 1000
    )  # room for the next job's file, not its model
    over = create_job(client, registered_model, chat_lines(12))
    runner.run(over)
    failed = client.get(f"/v1/fine_tuning/jobs/{over}").json()
    assert failed["status"] == "failed" and failed["fine_tuned_model"] is None
    assert failed["error"]["code"] == "storage_quota_exceeded"
    assert failed["error"]["message"].startswith("The fine-tuned model was not published: ")
    assert failed["result_files"] == []
    attempt = settings.artifacts_root / "jobs" / over / "attempt-1"
    assert not (attempt / "adapter").exists()
    assert organization(client, tenant)["storage_used_bytes"] == stored_bytes(settings)

    # Deleting the first model and the failed job's checkpoints frees their bytes.
    before = organization(client, tenant)["storage_used_bytes"]
    assert client.delete(f"/v1/models/{job['fine_tuned_model']}").status_code == 200
    for checkpoint in client.get(f"/v1/fine_tuning/jobs/{over}/checkpoints").json()["data"]:
        assert client.delete(f"/v1/models/{checkpoint['fine_tuned_model_checkpoint']}").status_code == 200
    after = organization(client, tenant)["storage_used_bytes"]
    assert after < before and after == stored_bytes(settings)


# A real API process: where it spools uploads, and the CLI setting a quota over HTTP.


@dataclass(frozen=True)
class ApiProcess:
    base_url: str
    key: str
    pid: int
    data_dir: Path
    temp_dir: Path

    def open_files(self) -> list[str]:
        """Where the server's open file descriptors point (a deleted spool file too: `.../#123 (deleted)`)."""
        fds = Path(f"/proc/{self.pid}/fd")
        return [os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()]


@pytest.fixture
def api_process(tmp_path: Path, postgres_url: str, redis_url: str) -> Iterator[ApiProcess]:
    """`ftjobs api` with TMPDIR pointed at an empty directory of its own."""
    temp = tmp_path / "system-tmp"
    temp.mkdir()
    env = distributed_env(tmp_path / "data", postgres_url, redis_url, admin_key=ADMIN)
    key = create_key(env, "spooled")
    port = free_port()
    args = ["api", "--host", "127.0.0.1", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with process(
        args, {**env, "TMPDIR": str(temp)}, tmp_path / "api.log", health_url=f"{base}/healthz"
    ) as proc:
        yield ApiProcess(f"{base}/v1", key, proc.pid, tmp_path / "data", temp)


def test_uploads_are_spooled_inside_the_data_directory_and_the_cli_sets_quotas(
    api_process: ApiProcess,
) -> None:
    """While an upload streams in, the server's spool file is open under DATA_DIR/tmp and nothing is open or
    left in the system temp directory (Starlette's form parser spooled parts over 1 MB there)."""
    server = api_process
    big = LINE.encode() * 100_000  # 3.5 MB
    spooled: list[str] = []

    def spool_files() -> list[str]:
        roots = (str(server.data_dir / "tmp"), str(server.temp_dir))
        return [path for path in server.open_files() if path.startswith(roots)]

    def body(watch: bool = True) -> Iterator[bytes]:
        yield b'--x\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]
            if (
                watch and start == 2 << 20
            ):  # 2 MB sent: past Starlette's 1 MB in memory, so a spool file is open
                wait_for(lambda: bool(spool_files()), 10, "a spool file")
                spooled.extend(spool_files())
        yield b"\r\n--x--\r\n"

    headers = {"Authorization": f"Bearer {server.key}", "content-type": "multipart/form-data; boundary=x"}
    response = httpx.post(f"{server.base_url}/files", content=body(), headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == len(big)
    assert spooled and all(f.startswith(str(server.data_dir / "tmp")) for f in spooled), spooled
    assert list(server.temp_dir.iterdir()) == []

    env = {"FTJOBS_BASE_URL": server.base_url, "FTJOBS_ADMIN_KEY": ADMIN, "OPENAI_BASE_URL": None}
    runner = CliRunner()
    result = runner.invoke(cli_app, ["admin", "orgs", "set-quota", "spooled", "1000", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["storage_limit_bytes"] == 1000
    listed = runner.invoke(cli_app, ["admin", "orgs", "list"], env=env)
    assert "spooled" in listed.stdout and str(len(big)) in listed.stdout
    refused = httpx.post(f"{server.base_url}/files", content=body(watch=False), headers=headers, timeout=60)
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "storage_quota_exceeded"
    reset = runner.invoke(cli_app, ["admin", "orgs", "set-quota", "spooled", "default", "--json"], env=env)
    assert json.loads(reset.stdout)["storage_quota_bytes"] is None
    assert runner.invoke(cli_app, ["admin", "orgs", "set-quota", "spooled", "lots"], env=env).exit_code == 2
