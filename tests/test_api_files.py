"""Files API on Postgres and SQLite: every route and its error paths, in OpenAI's shapes."""

import io
import json

from fastapi.testclient import TestClient

from models.settings import Settings
from tests.conftest import Tenant

LINE = json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n"


def upload(client: TestClient, content: bytes = LINE.encode() * 10, name: str = "train.jsonl", **data: str):
    return client.post(
        "/v1/files", files={"file": (name, io.BytesIO(content))}, data={"purpose": "fine-tune", **data}
    )


def assert_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert response.headers["x-request-id"]
    return error


def test_upload_returns_file_object(client: TestClient) -> None:
    content = LINE.encode() * 10
    response = upload(client, content)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("file-")
    assert body["object"] == "file"
    assert body["bytes"] == len(content)
    assert body["filename"] == "train.jsonl"
    assert body["purpose"] == "fine-tune"
    assert body["status"] == "processed"
    # Unset, they are absent: the openai SDKs declare them optional but not nullable.
    assert "expires_at" not in body and "status_details" not in body
    assert isinstance(body["created_at"], int)
    assert client.get(f"/v1/files/{body['id']}").json() == body
    assert client.get(f"/v1/files/{body['id']}/content").content == content


def test_filename_is_a_label_never_a_path(client: TestClient, settings: Settings) -> None:
    body = upload(client, name="../../etc/passwd").json()
    assert body["filename"] == "passwd"
    stored = list((settings.artifacts_root / "files").iterdir())
    assert [p.name for p in stored] == [body["id"]]


def test_list_orders_paginates_and_filters(client: TestClient) -> None:
    ids = [upload(client).json()["id"] for _ in range(3)]
    listed = client.get("/v1/files").json()
    assert listed["object"] == "list"
    assert [f["id"] for f in listed["data"]] == ids[::-1]
    assert listed["has_more"] is False
    assert (listed["first_id"], listed["last_id"]) == (ids[2], ids[0])
    assert client.get("/v1/files", params={"after": ""}).json() == listed  # `?after=` is no cursor
    page = client.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in page["data"]] == [ids[2], ids[1]] and page["has_more"] is True
    rest = client.get("/v1/files", params={"limit": 2, "after": ids[1]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and rest["has_more"] is False
    ascending = client.get("/v1/files", params={"order": "asc"}).json()
    assert [f["id"] for f in ascending["data"]] == ids
    assert client.get("/v1/files", params={"purpose": "fine-tune-results"}).json()["data"] == []


def test_delete_removes_row_and_bytes(client: TestClient, settings: Settings) -> None:
    file_id = upload(client).json()["id"]
    assert client.delete(f"/v1/files/{file_id}").json() == {"id": file_id, "object": "file", "deleted": True}
    assert not (settings.artifacts_root / "files" / file_id).exists()
    assert_error(client.get(f"/v1/files/{file_id}"), 404, "file_id", "not_found")


def test_expiring_file(client: TestClient) -> None:
    body = upload(client, **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"}).json()
    assert body["expires_at"] == body["created_at"] + 3600
    too_short = upload(client, **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "10"})
    assert_error(too_short, 400, "expires_after[seconds]")


def test_upload_errors(client: TestClient) -> None:
    assert_error(upload(client, purpose="assistants"), 400, "purpose")
    missing_file = client.post("/v1/files", data={"purpose": "fine-tune"})
    assert_error(missing_file, 400, "file")
    missing_purpose = client.post("/v1/files", files={"file": ("a.jsonl", io.BytesIO(b"{}"))})
    assert_error(missing_purpose, 400, "purpose")


def test_unknown_ids_are_404(client: TestClient) -> None:
    for method, path in [
        ("GET", "/v1/files/file-nope"),
        ("GET", "/v1/files/file-nope/content"),
        ("DELETE", "/v1/files/file-nope"),
    ]:
        assert_error(client.request(method, path), 404, "file_id", "not_found")
    assert_error(client.get("/v1/files", params={"after": "file-nope"}), 400, "after")
    assert_error(client.get("/v1/files", params={"limit": 0}), 400, "limit")
    assert_error(client.get("/v1/files", params={"order": "sideways"}), 400, "order")


def test_upload_over_the_limit_is_413(settings: Settings, dispatcher, tenant: Tenant) -> None:  # type: ignore[no-untyped-def]
    from api.main import create_app

    small = settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(create_app(small, dispatcher), headers=tenant.headers) as client:
        assert_error(upload(client, b"x" * 5000), 413)

        # Without Content-Length the limit is enforced while the body streams in.
        def chunks():  # type: ignore[no-untyped-def]
            for _ in range(10):
                yield b"y" * 500

        streamed = client.post(
            "/v1/files", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
        )
        assert_error(streamed, 413)
        assert upload(client, LINE.encode()).status_code == 200
    assert not any((small.artifacts_root / "files").glob("*.partial"))


def test_database_down_is_503_with_retry_after(tmp_path, dispatcher) -> None:  # type: ignore[no-untyped-def]
    """A real driver failing to connect (nothing listens on port 1): 503, never 500; the SDK retries it."""
    from api.main import create_app

    settings = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://postgres@127.0.0.1:1/none")
    # The key can't be checked without the database either: 503 from the authentication, not 401.
    key = {"Authorization": "Bearer sk-ftj-somekey-somesecret"}
    with TestClient(create_app(settings, dispatcher), raise_server_exceptions=False, headers=key) as client:
        for response in (client.get("/v1/fine_tuning/jobs"), client.get("/healthz"), upload(client)):
            error = assert_error(response, 503, code="service_unavailable")
            assert error["type"] == "server_error"
            assert response.headers["retry-after"] == "5"
