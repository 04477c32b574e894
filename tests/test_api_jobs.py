"""Fine-tuning jobs API on Postgres and SQLite: every route, every field, every error path."""

import io
import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.fine_tuning import FineTuningJob

from models.db import session_scope
from models.files import FileRepository
from models.jobs import JobRepository
from models.registry import ModelRegistry
from models.settings import Settings
from models.spec import ResolvedHyperparameters
from models.states import JobStatus, transition
from models.storage import LocalArtifactStore
from tests.conftest import RecordingDispatcher, Tenant
from tests.jobs_helpers import chat_lines
from tests.test_api_files import assert_error, upload
from worker.runner import JobRunner

JOB_FIELDS = {
    "id", "object", "created_at", "model", "status", "training_file", "validation_file", "fine_tuned_model",
    "finished_at", "trained_tokens", "result_files", "hyperparameters", "method", "organization_id", "seed",
    "error", "estimated_finish", "integrations", "metadata", "user_provided_suffix",
    "evaluation", "export_merged", "compute", "publish", "published_step", "priority", "preemptible",
    "usage",  # extensions
}  # fmt: skip


@pytest.fixture
def training_file(client: TestClient) -> str:
    return upload(client).json()["id"]


def create(client: TestClient, model: str, training_file: str, **body: object):  # type: ignore[no-untyped-def]
    return client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": training_file, **body})


def test_create_returns_complete_job(
    client: TestClient,
    registered_model: str,
    training_file: str,
    dispatcher: RecordingDispatcher,
    tenant: Tenant,
) -> None:
    hyperparameters = {"n_epochs": 2, "lora_r": 4, "learning_rate": 1e-3}
    response = create(
        client,
        registered_model,
        training_file,
        validation_file=training_file,
        suffix="my-model",
        seed=7,
        metadata={"team": "search"},
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert set(job) == JOB_FIELDS
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job"
    assert job["status"] == "validating_files"
    assert (job["model"], job["training_file"], job["validation_file"]) == (
        registered_model,
        training_file,
        training_file,
    )
    assert (job["seed"], job["metadata"], job["user_provided_suffix"]) == (7, {"team": "search"}, "my-model")
    assert job["fine_tuned_model"] is None and job["finished_at"] is None and job["error"] is None
    assert job["result_files"] == [] and job["organization_id"] == tenant.id
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"}
    echoed = job["method"]["supervised"]["hyperparameters"]
    assert echoed["lora_r"] == 4 and echoed["learning_rate"] == 1e-3 and echoed["n_epochs"] == 2
    assert dispatcher.submitted == [job["id"]]
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json() == job
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert [e["message"] for e in events] == [
        f"Validating training file: {training_file} and validation file: {training_file}",
        f"Created fine-tuning job: {job['id']}",
    ]


def test_defaults_and_legacy_hyperparameters(
    client: TestClient, registered_model: str, training_file: str
) -> None:
    job = create(client, registered_model, training_file).json()
    assert job["method"]["type"] == "supervised"
    assert job["hyperparameters"] == {
        "n_epochs": "auto",
        "batch_size": "auto",
        "learning_rate_multiplier": "auto",
    }
    assert isinstance(job["seed"], int)
    legacy = create(
        client, registered_model, training_file, hyperparameters={"n_epochs": 3, "batch_size": 2}
    ).json()
    assert legacy["hyperparameters"]["n_epochs"] == 3
    assert legacy["method"]["supervised"]["hyperparameters"]["batch_size"] == 2


@pytest.mark.parametrize(
    ("hyperparameters", "param"),
    [
        ({"n_epochs": 0}, "n_epochs"),
        ({"n_epochs": 51}, "n_epochs"),
        ({"n_epochs": "3"}, "n_epochs"),
        ({"batch_size": 257}, "batch_size"),
        ({"learning_rate_multiplier": 0}, "learning_rate_multiplier"),
        ({"lora_r": 0}, "lora_r"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_target_modules": []}, "lora_target_modules"),
        ({"max_seq_length": 4}, "max_seq_length"),
        ({"warmup_ratio": 2}, "warmup_ratio"),
        ({"lora_rank": 8}, "lora_rank"),
        ({"training_type": "magic"}, "training_type"),
        ({"training_type": "full", "lora_r": 8}, "lora_r"),
        ({"training_type": "lora", "trainable_layers": 2}, "trainable_layers"),
        ({"training_type": "qlora", "num_virtual_tokens": 8}, "num_virtual_tokens"),
        ({"training_type": "prompt_tuning", "num_virtual_tokens": 0}, "num_virtual_tokens"),
    ],
)
def test_bad_hyperparameters_are_400_with_param(
    client: TestClient, registered_model: str, training_file: str, hyperparameters: dict, param: str
) -> None:
    method = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    response = create(client, registered_model, training_file, method=method)
    assert_error(response, 400, f"method.supervised.hyperparameters.{param}")


def test_training_type_is_echoed(client: TestClient, registered_model: str, training_file: str) -> None:
    hyperparameters = {"training_type": "freeze", "trainable_layers": 0}
    job = create(client, registered_model, training_file, hyperparameters=hyperparameters).json()
    assert job["method"]["supervised"]["hyperparameters"]["training_type"] == "freeze"
    assert job["method"]["supervised"]["hyperparameters"]["trainable_layers"] == 0
    legacy_mismatch = create(
        client, registered_model, training_file, hyperparameters={"training_type": "full", "lora_r": 4}
    )
    assert_error(legacy_mismatch, 400, "hyperparameters.lora_r")


def test_create_errors(client: TestClient, registered_model: str, training_file: str) -> None:
    assert_error(create(client, "no-such-model", training_file), 400, "model", "model_not_found")
    assert_error(create(client, registered_model, "file-nope"), 400, "training_file", "file_not_found")
    assert_error(
        create(client, registered_model, training_file, validation_file="file-nope"), 400, "validation_file"
    )
    assert_error(create(client, registered_model, training_file, suffix="a:b"), 400, "suffix")
    assert_error(create(client, registered_model, training_file, suffix="x" * 65), 400, "suffix")
    assert_error(create(client, registered_model, training_file, seed=-1), 400, "seed")
    too_much = {f"k{i}": "v" for i in range(17)}
    assert_error(create(client, registered_model, training_file, metadata=too_much), 400, "metadata")
    assert_error(create(client, registered_model, training_file, method={"type": "dpo"}), 400, "method.type")
    assert_error(
        create(client, registered_model, training_file, method={"type": "magic"}), 400, "method.type"
    )
    both = {"method": {"type": "supervised"}, "hyperparameters": {"n_epochs": 1}}
    assert_error(create(client, registered_model, training_file, **both), 400, "hyperparameters")
    comet = [{"type": "comet"}]  # more in tests/test_integrations.py
    assert_error(
        create(client, registered_model, training_file, integrations=comet), 400, "integrations.0.type"
    )
    assert_error(create(client, registered_model, training_file, colour="blue"), 400, "colour")
    assert_error(client.post("/v1/fine_tuning/jobs", json={"model": registered_model}), 400, "training_file")
    bad_json = client.post(
        "/v1/fine_tuning/jobs", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert_error(bad_json, 400)
    assert_error(client.post("/v1/fine_tuning/jobs", json=[1, 2]), 400)


@pytest.mark.parametrize(
    ("content_type", "encode"),
    [
        ("application/x-www-form-urlencoded", lambda fields: "&".join(f"{k}={v}" for k, v in fields.items())),
        ("text/plain", json.dumps),
        (None, json.dumps),
    ],
)
def test_a_json_route_refuses_other_content_types(
    client: TestClient, registered_model: str, training_file: str, content_type: str | None, encode
) -> None:
    """As OpenAI does, even for a body that would be valid as JSON; uploads (multipart) are another route."""
    fields = {"model": registered_model, "training_file": training_file}
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/fine_tuning/jobs", content=encode(fields).encode(), headers=headers)
    error = assert_error(response, 400, None, "unsupported_content_type")
    assert "only accepts 'application/json'" in error["message"]
    assert (f"'Content-Type: {content_type}'" if content_type else "no Content-Type") in error["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_results_files_cannot_train(
    client: TestClient,
    registered_model: str,
    session_factory,
    settings,  # type: ignore[no-untyped-def]
    tenant: Tenant,
) -> None:
    with session_scope(session_factory) as session:
        results = FileRepository(session).store(
            LocalArtifactStore(settings.artifacts_root),
            organization_id=tenant.id,
            source=io.BytesIO(b"step\n"),
            filename="step_metrics.csv",
            purpose="fine-tune-results",
        )
    response = create(client, registered_model, results.id)
    assert_error(response, 400, "training_file", "invalid_file_purpose")


def test_list_newest_first_with_cursor_and_metadata(
    client: TestClient, registered_model: str, training_file: str
) -> None:
    ids = [
        create(client, registered_model, training_file, metadata={"run": str(i % 2)} if i else None).json()[
            "id"
        ]
        for i in range(5)
    ]
    listed = client.get("/v1/fine_tuning/jobs").json()
    assert [j["id"] for j in listed["data"]] == ids[::-1] and listed["has_more"] is False
    assert client.get("/v1/fine_tuning/jobs", params={"after": ""}).json() == listed  # no cursor
    first = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[:2:-1][:2] and first["has_more"] is True
    second = client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": first["last_id"]}).json()
    assert [j["id"] for j in second["data"]] == [ids[2], ids[1]]
    odd = client.get("/v1/fine_tuning/jobs?metadata[run]=1").json()["data"]
    assert [j["id"] for j in odd] == [ids[3], ids[1]]
    assert client.get("/v1/fine_tuning/jobs?metadata[run]=1&metadata[other]=x").json()["data"] == []
    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs?metadata=null").json()["data"]] == [ids[0]]
    assert_error(client.get("/v1/fine_tuning/jobs", params={"after": "ftjob-nope"}), 400, "after")
    assert_error(client.get("/v1/fine_tuning/jobs", params={"limit": 101}), 400, "limit")


def test_list_filters_by_status(client: TestClient, registered_model: str, training_file: str) -> None:
    ids = [create(client, registered_model, training_file).json()["id"] for _ in range(4)]
    client.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel")
    client.post(f"/v1/fine_tuning/jobs/{ids[2]}/pause")

    def listed(*statuses: str, **params: object) -> list[str]:
        query = {"status": list(statuses), **params}
        return [job["id"] for job in client.get("/v1/fine_tuning/jobs", params=query).json()["data"]]

    assert listed("cancelled") == [ids[0]]
    assert listed("paused", "cancelled") == [ids[2], ids[0]]
    assert listed("validating_files") == [ids[3], ids[1]]
    assert listed("validating_files", limit=1, after=ids[3]) == [ids[1]]  # pages within the filter
    assert listed("succeeded") == []
    assert_error(client.get("/v1/fine_tuning/jobs", params={"status": "done"}), 400, "status.0")


def test_cancel(client: TestClient, registered_model: str, training_file: str) -> None:
    job_id = create(client, registered_model, training_file).json()["id"]
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"] is not None
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"][0]["message"] == (
        "Fine-tuning job cancelled"
    )
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"), 400)
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "cancelled"


def test_pause_and_resume(
    client: TestClient, registered_model: str, training_file: str, dispatcher: RecordingDispatcher
) -> None:
    job_id = create(client, registered_model, training_file).json()["id"]
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/resume"), 400)  # not paused
    assert (
        client.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
    )  # while validating
    client.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    # Move the job on as a runner would once its files are valid.
    with session_scope(client.app.state.session_factory) as session:
        transition(session, job_id, from_=JobStatus.QUEUED, to=JobStatus.RUNNING)
    paused = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/pause"), 400)
    assert_error(client.delete(f"/v1/files/{training_file}"), 400, "file_id", "file_in_use")
    dispatcher.submitted.clear()
    resumed = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    assert dispatcher.submitted == [job_id]
    messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]]
    assert messages[:2] == ["Fine-tuning job resumed", "Fine-tuning job paused"]
    client.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"


def test_files_of_unfinished_jobs_cannot_be_deleted(
    client: TestClient, registered_model: str, training_file: str
) -> None:
    job_id = create(client, registered_model, training_file).json()["id"]
    assert_error(client.delete(f"/v1/files/{training_file}"), 400, "file_id", "file_in_use")
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert client.delete(f"/v1/files/{training_file}").status_code == 200


def test_events_and_checkpoints_pages(client: TestClient, registered_model: str, training_file: str) -> None:
    job_id = create(client, registered_model, training_file).json()["id"]
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 2}).json()
    assert len(events["data"]) == 2 and events["has_more"] is True
    assert {e["object"] for e in events["data"]} == {"fine_tuning.job.event"}
    rest = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": events["last_id"]}).json()
    assert [e["message"] for e in rest["data"]] == [f"Created fine-tuning job: {job_id}"]
    unpaged = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 2, "after": ""}).json()
    assert unpaged == events  # an empty cursor is no cursor
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"after": ""}).json()
    assert checkpoints == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


def test_unknown_job_routes_are_404(client: TestClient) -> None:
    routes = [("GET", ""), ("POST", "/cancel"), ("POST", "/pause"), ("POST", "/resume"), ("GET", "/events")]
    for method, suffix in [*routes, ("GET", "/checkpoints")]:
        response = client.request(method, f"/v1/fine_tuning/jobs/ftjob-nope{suffix}")
        assert_error(response, 404, "fine_tuning_job_id", "not_found")


def test_envelope_for_unknown_routes_and_health(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.put("/v1/fine_tuning/jobs"), 405)
    health = client.get("/healthz", headers={"x-request-id": "abc"})
    assert health.status_code == 200 and health.headers["x-request-id"] == "abc"
    assert json.loads(health.text) == {"status": "ok"}


CHAT = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
TEXT = b'{"text": "raw text for continued pre-training"}\n'
CLASSIFICATION = b'{"text": "a fine film", "label": "positive"}\n'
PREFERENCE = (
    b'{"input": {"messages": [{"role": "user", "content": "hi"}]}, '
    b'"preferred_output": [{"role": "assistant", "content": "hello"}], '
    b'"non_preferred_output": [{"role": "assistant", "content": "go away"}]}\n'
)


BEST = "metric_for_best_checkpoint"


def method(method_type: str, **hyperparameters: object) -> dict[str, object]:
    return {"type": method_type, method_type: {"hyperparameters": hyperparameters}}


@pytest.mark.parametrize(
    ("content", "body_method", "param"),
    [
        (PREFERENCE, method("supervised"), "method.type"),
        (CHAT, method("dpo"), "method.type"),
        (CLASSIFICATION, method("reward_model"), "method.type"),
        (PREFERENCE, method("reward_model", training_type="prefix_tuning"), "training_type"),
        (CHAT, method("supervised", training_type="feature_extraction"), "training_type"),
        (PREFERENCE, method("dpo", training_type="feature_extraction"), "training_type"),
        (CLASSIFICATION, method("supervised", packing=True), "packing"),
        (TEXT, method("supervised", generation_eval_samples=4), "generation_eval_samples"),
        (CLASSIFICATION, method("supervised", **{BEST: "bleu"}), BEST),
        (CHAT, method("supervised", **{BEST: "macro_f1"}), BEST),
        (PREFERENCE, method("dpo", beta=3), "beta"),
        (PREFERENCE, method("dpo", beta=0), "beta"),
    ],
)  # fmt: skip
def test_combinations_that_cannot_train_are_400_at_create_time(
    client: TestClient, registered_model: str, content: bytes, body_method: dict, param: str
) -> None:
    training_file = upload(client, content * 10).json()["id"]
    response = create(client, registered_model, training_file, method=body_method)
    where = (
        "method.type" if param == "method.type" else f"method.{body_method['type']}.hyperparameters.{param}"
    )
    assert_error(response, 400, where)


@pytest.mark.parametrize(
    ("content", "body_method"),
    [
        (PREFERENCE, method("dpo", beta=0.5, training_type="lora")),
        (PREFERENCE, method("reward_model")),
        (CLASSIFICATION, method("supervised", training_type="feature_extraction")),
        (CLASSIFICATION, method("supervised", metric_for_best_checkpoint="accuracy")),
        (TEXT, method("supervised", packing=False, eval_steps=5, early_stopping_patience=2)),
        (b"not json\n", method("dpo")),  # the job's own validation says what is wrong with the file
    ],
)
def test_fitting_combinations_are_accepted_and_echoed(
    client: TestClient, registered_model: str, content: bytes, body_method: dict
) -> None:
    training_file = upload(client, content * 10).json()["id"]
    response = create(client, registered_model, training_file, method=body_method)
    assert response.status_code == 200, response.text
    method_type = body_method["type"]
    echoed = response.json()["method"]
    assert echoed["type"] == method_type
    given = body_method[method_type]["hyperparameters"]
    assert given.items() <= echoed[method_type]["hyperparameters"].items()


def test_encoder_models_cannot_train_generative_objectives(
    client: TestClient,
    session_factory,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with session_scope(session_factory) as session:
        ModelRegistry(session).register("tiny-bert", str(encoder), "local")
    for content, body_method in [(CHAT, method("supervised")), (TEXT, method("supervised"))]:
        training_file = upload(client, content * 10).json()["id"]
        assert_error(create(client, "tiny-bert", training_file, method=body_method), 400, "model")
    classification = upload(client, CLASSIFICATION * 10).json()["id"]
    assert create(client, "tiny-bert", classification).status_code == 200


def refs(schema: object) -> Iterator[str]:
    """The names of the components a JSON schema refers to."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            yield schema["$ref"].rsplit("/", 1)[-1]
        for value in schema.values():
            yield from refs(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from refs(item)


def test_every_field_of_the_create_request_is_described(client: TestClient) -> None:
    components = client.app.openapi()["components"]["schemas"]  # type: ignore[attr-defined]
    undescribed, seen, pending = [], set(), ["JobCreate"]
    while pending:
        name = pending.pop()
        seen.add(name)
        properties = components[name].get("properties", {})
        undescribed += [
            f"{name}.{field}" for field, schema in properties.items() if not schema.get("description")
        ]
        pending += [ref for ref in refs(properties) if ref not in seen]
    assert {"Method", "SupervisedHyperparameters", "DpoHyperparameters", "WandbIntegration"} <= seen
    assert undescribed == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"method": {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.5}}}}, "method.dpo"),
        ({"method": {"type": "dpo", "supervised": {}}}, "method.supervised"),
        ({"method": {"type": "supervised", "reward_model": {}}}, "method.reward_model"),
        ({"export_merged": "yes"}, "export_merged"),
        ({"export_merged": 1}, "export_merged"),
        ({"export_merged": "true"}, "export_merged"),
    ],
)
def test_method_objects_of_another_type_and_non_boolean_export_merged_are_400(
    client: TestClient, registered_model: str, training_file: str, body: dict, param: str
) -> None:
    assert_error(create(client, registered_model, training_file, **body), 400, param)


@pytest.mark.e2e
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_started_jobs_own_method_creates_the_same_job_again(
    client: TestClient,
    settings: Settings,
    session_factory,  # type: ignore[no-untyped-def]
    registered_model: str,
) -> None:
    """A LoRA job resolves every knob, but echoes only its own: no `beta` (dpo), `trainable_layers`
    (freeze), `num_virtual_tokens` (prompt methods), nor `packing` it was not given (sft and pretrain only),
    so its `method`, sent back through the openai client, is accepted and resolves to the same values."""
    api = openai.OpenAI(
        base_url="http://testserver/v1",
        api_key=client.headers["Authorization"].removeprefix("Bearer "),
        http_client=client,
        max_retries=0,
    )
    runner = JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root))
    training_file = upload(client, chat_lines(10)).json()["id"]

    def run(method: dict) -> FineTuningJob:
        job = api.fine_tuning.jobs.create(model=registered_model, training_file=training_file, method=method)  # type: ignore[arg-type]
        runner.run(job.id)
        return api.fine_tuning.jobs.retrieve(job.id)

    given = {"n_epochs": 1, "batch_size": 4, "max_seq_length": 512, "lora_r": 4}
    job = run({"type": "supervised", "supervised": {"hyperparameters": given}})
    assert job.status == "succeeded", job.error
    echoed = job.method.model_dump(exclude_none=True)["supervised"]["hyperparameters"]
    assert given.items() <= echoed.items() and echoed["training_type"] == "lora"
    assert {"lora_alpha", "learning_rate", "warmup_ratio"} <= set(echoed)
    assert not {"beta", "trainable_layers", "num_virtual_tokens", "packing"} & set(echoed)

    clone = run(job.method.model_dump(exclude_none=True))
    assert clone.status == "succeeded", clone.error
    assert clone.method.model_dump() == job.method.model_dump()
    assert clone.hyperparameters == job.hyperparameters
    with session_scope(session_factory) as session:
        rows = [JobRepository(session).get(job.id), JobRepository(session).get(clone.id)]
        resolved = [row.hyperparameters for row in rows if row is not None]
    assert all(isinstance(hp, ResolvedHyperparameters) for hp in resolved) and resolved[0] == resolved[1]
