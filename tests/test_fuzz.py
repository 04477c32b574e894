"""Every operation of the service's own OpenAPI schema, fuzzed with schemathesis (valid and invalid data,
requests without a key): no input gets a 5xx, and every answer is one the schema declares (status code,
content type, body).

Postgres only: it refuses what SQLite stores (NUL characters), and one database keeps the module short. Some
drawn ids are swapped for real ones (a file, a job, a webhook endpoint, the registered model), so the
success paths and their response schemas are checked too, not only the 404s; a model named outside Latin-1
is among them, and values random draws rarely reach (64-bit seeds, tiny temperatures, path-like suffixes, NUL
or too many `metadata[...]` filters) are drawn on purpose. Nothing is excluded: the
inference routes validate and resolve the model like any route, and only a request that passes both meets
the missing inference server (the 503 below).
"""

from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import strategies as st
from pydantic import SecretStr
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.schemas import BaseSchema
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from models.settings import Settings
from tests.conftest import RecordingDispatcher, Tenant
from tests.test_api_files import upload
from tests.test_hostile_input import publish

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
INFERENCE_PATHS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/classifications",
    "/v1/fine_tuning/preflight",  # the inference server measures the files
}
ADMIN_KEY = "sk-ftjadmin-fuzz-secret"


@pytest.fixture
def api_schema(settings: Settings) -> Iterator[BaseSchema]:
    # Nothing listens on port 1, so a forwarded inference request fails at once. No rate limit: the fuzzer
    # sends hundreds of requests a minute.
    fuzzed = settings.model_copy(
        update={
            "inference_url": "http://127.0.0.1:1",
            "rate_limit_per_minute": 0,
            "admin_key": SecretStr(ADMIN_KEY),
        }
    )
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(fuzzed, RecordingDispatcher()))
    shutdown_lifespans()  # closes the app's engine before the database is truncated


@pytest.fixture
def known(
    client: TestClient,
    registered_model: str,
    tenant: Tenant,
    settings: Settings,
    session_factory: sessionmaker[Session],
) -> dict[str, list[str]]:
    """Real values, under the names the schema gives them (path parameters, body fields)."""
    file_id = upload(client).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={"model": registered_model, "training_file": file_id})
    # A model published before suffixes were limited to ASCII: its name reaches the download's headers.
    odd_job = client.post("/v1/fine_tuning/jobs", json={"model": registered_model, "training_file": file_id})
    odd_model = f'ft:{registered_model}:local:模型🚀"x:{odd_job.json()["id"][6:14]}'
    publish(settings, session_factory, odd_job.json()["id"], odd_model)
    # A name is only resolved when a delivery is sent: this one never is (no job of the fuzz ends).
    endpoint = client.post("/v1/webhook_endpoints", json={"url": "https://hooks.example.com/ftjobs"})
    return {
        "file_id": [file_id],
        "fine_tuning_job_id": [job.json()["id"]],
        "webhook_endpoint_id": [endpoint.json()["id"]],
        "model": [registered_model, odd_model],
        "training_file": [file_id],
        "validation_file": [file_id],
        "purpose": ["fine-tune"],
        "organization_id": [tenant.id],
    }


SAMPLING_EDGES = {
    "seed": st.sampled_from([2**64, -(2**70), 2**64 - 1, -(2**63)]),
    "temperature": st.sampled_from([1e-300, 5e-324, 1e-5, 0.0]),
}
EDGES = {
    "/v1/chat/completions": SAMPLING_EDGES,
    "/v1/completions": SAMPLING_EDGES,
    "/v1/fine_tuning/jobs": {"suffix": st.sampled_from(["模型🚀", "../../x", 'a"b', "%2e%2e", "v1.2_x-y"])},
}
"""Body values each POST route allows (or allowed) that once broke it: random draws rarely reach them."""
METADATA_FILTERS = st.one_of(
    st.dictionaries(st.text(max_size=70), st.text(max_size=20), max_size=20),  # NUL and odd keys included
    st.integers(17, 2000).map(lambda n: {f"k{i}": "v" for i in range(n)}),
)
"""`metadata[key]=value` filters of the job list: parsed from the query string, so not in the schema."""


def swap_in_known(case: Case, known: dict[str, list[str]], data: st.DataObject) -> None:
    body = case.body if isinstance(case.body, dict) else {}
    for values in (case.path_parameters or {}, body):
        for name in sorted(values.keys() & known.keys()):
            if data.draw(st.booleans(), label=f"real {name}"):
                values[name] = data.draw(st.sampled_from(known[name]), label=name)


def add_edges(case: Case, data: st.DataObject) -> None:
    if case.method == "POST" and isinstance(case.body, dict):
        for name, values in EDGES.get(case.path, {}).items():
            if data.draw(st.booleans(), label=f"edge {name}"):
                case.body[name] = data.draw(values, label=name)
    if case.method == "GET" and case.path == "/v1/fine_tuning/jobs":
        filters = data.draw(METADATA_FILTERS, label="metadata filters")
        case.query = {**(case.query or {}), **{f"metadata[{key}]": value for key, value in filters.items()}}


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
# too_slow: drawing the nested job bodies can take a while on a loaded 2-core CI machine.
@hypothesis.settings(max_examples=30, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
@schema.given(data=st.data())
@schema.parametrize()
def test_every_operation_answers_as_declared_and_never_5xx(
    case: Case, data: st.DataObject, tenant: Tenant, known: dict[str, list[str]]
) -> None:
    swap_in_known(case, known, data)
    add_edges(case, data)
    admin = case.path.startswith("/v1/admin/")
    response = case.call(headers={"Authorization": f"Bearer {ADMIN_KEY}"} if admin else tenant.headers)
    # By design, not a fault: a valid inference request naming a servable model is forwarded, and no
    # inference server runs here (tests/inference/ and tests/e2e/ test the served answers).
    forwarded = case.path in INFERENCE_PATHS and response.status_code == 503
    forwarded = forwarded and response.json()["error"]["code"] == "inference_unavailable"
    case.validate_response(response, checks=CHECKS, excluded_checks=[not_a_server_error] if forwarded else [])
