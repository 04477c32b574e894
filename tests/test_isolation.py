"""Organisations are isolated: every object of organisation A (files and their content, jobs, events,
checkpoints, results files, fine-tuned models, their artifacts and inference with them) answers another
organisation's key exactly as an object that never existed would: a 404 (a 400 where the service reports
an unknown file or cursor as invalid input) in OpenAI's envelope, holding none of A's data.

The matrix is checked against the routes the app serves, so a new /v1 route fails here until it has a
row. Each row also runs with A's own key (the positive control), so its 404s are not vacuous. A runs one
real tiny job, on Postgres.
"""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import fastapi.routing
import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from api.main import create_app
from models.db import make_engine, make_session_factory, session_scope
from models.registry import ModelRegistry
from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.conftest import RecordingDispatcher, Tenant, fresh_postgres_database, make_tenant
from tests.jobs_helpers import chat_lines
from tests.test_api_files import upload
from tests.test_api_models import openai_client
from tests.test_api_reinforcement import prompts
from tests.test_idempotency import create
from tests.test_idempotency import upload as upload_with_key
from tests.test_runner import FAST
from worker.runner import JobRunner

MODEL = "tiny-llama"
JOB_KEY, PAUSE_KEY, FILE_KEY = "alpha-job", "alpha-pause", "alpha-file"
METADATA = {"team": "alpha-secret-team"}
CHAT = [{"role": "user", "content": "hi"}]
ALPHA_WEBHOOKS = [
    {"url": "https://hooks.alpha-team.example/ftjobs", "name": "alpha-hook"},
    {"url": "https://hooks.alpha-team.example/spare", "name": "alpha-spare-hook"},
]
WEBHOOK = "/v1/webhook_endpoints/{webhook_endpoint_id}"

Route = tuple[str, str]
"""(method, path) as the app declares the route."""


@dataclass(frozen=True)
class Alpha:
    """What organisation A made."""

    training_file: str
    validation_file: str
    results_file: str
    job: str
    """Succeeded: events, checkpoints, a results file, a fine-tuned model and its merged export."""
    paused_job: str
    """Never ran; it uses `job`'s files, so they are in use and A can't delete them (a 400)."""
    tuned: str
    checkpoint: str
    """The newest checkpoint's model name."""
    spare_checkpoint: str
    """The oldest one: the DELETE row's positive control deletes it, so nothing else names it."""
    event: str
    checkpoint_id: str
    job_body: dict[str, Any]
    """What `job` was created with, under JOB_KEY."""
    secrets: frozenset[str]
    """Every id, name, label and content sample of A's: none may reach another organisation."""
    webhook: str
    """A webhook endpoint, registered before `job` ran: it has that job's delivery."""
    spare_webhook: str
    """Another: the DELETE row's positive control deletes it."""
    delivery: str
    sweep: str
    """Cancelled at once (its trials never run): A's own cancel is the state error, a 400."""

    @property
    def files(self) -> list[str]:
        return [self.training_file, self.validation_file, self.results_file]


@dataclass(frozen=True)
class Scene:
    app: FastAPI
    owner: TestClient
    """Calls with A's key."""
    stranger: TestClient
    """Calls with B's key."""
    alpha: Alpha
    bravo_file: str
    bravo_job: str
    bravo_webhook: str


def job_body(validation: str) -> dict[str, Any]:
    """What A's job is created with, besides its model and training file."""
    return {
        "validation_file": validation,
        "suffix": "alphatune",
        "metadata": METADATA,
        "export_merged": True,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {**FAST, "n_epochs": 2}}},
    }


def sweep_body(training: str, validation: str) -> dict[str, Any]:
    """A one-trial-at-a-time sweep over A's files."""
    return {
        "model": MODEL,
        "training_file": training,
        "validation_file": validation,
        "search_space": {"lora_r": [4, 8]},
        "max_trials": 2,
        "parallelism": 1,
    }


def first_user_turn(content: bytes) -> str:
    return str(json.loads(content.splitlines()[0])["messages"][1]["content"])


def listed(client: TestClient, path: str, **params: str) -> list[dict[str, Any]]:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def owned(client: TestClient) -> set[str]:
    """Every id and name the client's organisation sees of its own, as its key lists them."""
    found = set()
    for file in listed(client, "/v1/files"):
        found |= {file["id"], file["filename"]}
    for job in listed(client, "/v1/fine_tuning/jobs", limit="100"):
        found |= {job["id"], job["organization_id"], *job["result_files"]}
        found |= {job["fine_tuned_model"]} - {None}
        url = f"/v1/fine_tuning/jobs/{job['id']}"
        found |= {event["id"] for event in listed(client, f"{url}/events", limit="1000")}
        for checkpoint in listed(client, f"{url}/checkpoints", limit="100"):
            found |= {checkpoint["id"], checkpoint["fine_tuned_model_checkpoint"]}
    for model in listed(client, "/v1/models"):
        if model["owned_by"] != "system":
            lineage = client.get(f"/v1/models/{model['id']}").json()["lineage"]
            found |= {model["id"], lineage["training_file"]["sha256"], lineage["validation_file"]["sha256"]}
    for endpoint in listed(client, "/v1/webhook_endpoints"):
        found |= {endpoint["id"], endpoint["url"], endpoint["name"], endpoint["signing_secret_hint"]}
        for delivery in listed(client, f"/v1/webhook_endpoints/{endpoint['id']}/deliveries"):
            found |= {delivery["id"], delivery["event_id"]}
    return found


def make_alpha(owner: TestClient, runner: JobRunner, tenant: Tenant) -> Alpha:
    train, valid = chat_lines(12), chat_lines(4, "validation")
    hooks = [owner.post("/v1/webhook_endpoints", json=hook).json() for hook in ALPHA_WEBHOOKS]
    training = upload(owner, train, name="alpha-train.jsonl").json()["id"]
    validation = upload(owner, valid, name="alpha-valid.jsonl").json()["id"]
    body = job_body(validation)
    created = create(owner, JOB_KEY, MODEL, training, **body)
    assert created.status_code == 200, created.text
    runner.run(created.json()["id"])
    job = owner.get(f"/v1/fine_tuning/jobs/{created.json()['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    paused = create(owner, None, MODEL, training, validation_file=validation).json()["id"]
    pause = owner.post(f"/v1/fine_tuning/jobs/{paused}/pause", headers={"Idempotency-Key": PAUSE_KEY})
    assert pause.json()["status"] == "paused", pause.text
    sweep = owner.post("/v1/fine_tuning/sweeps", json=sweep_body(training, validation)).json()["id"]
    assert owner.post(f"/v1/fine_tuning/sweeps/{sweep}/cancel").json()["status"] == "cancelled"
    checkpoints = listed(owner, f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")
    assert len(checkpoints) >= 2, checkpoints
    contents = {first_user_turn(train), first_user_turn(valid)}
    secrets = owned(owner) | contents | {tenant.id, tenant.name, METADATA["team"]}
    secrets |= {hook["signing_secret"] for hook in hooks} | {sweep}
    return Alpha(
        training_file=training,
        validation_file=validation,
        results_file=job["result_files"][0],
        job=job["id"],
        paused_job=paused,
        tuned=job["fine_tuned_model"],
        checkpoint=checkpoints[0]["fine_tuned_model_checkpoint"],
        spare_checkpoint=checkpoints[-1]["fine_tuned_model_checkpoint"],
        event=listed(owner, f"/v1/fine_tuning/jobs/{job['id']}/events")[0]["id"],
        checkpoint_id=checkpoints[0]["id"],
        job_body=body,
        secrets=frozenset(secrets),
        webhook=hooks[0]["id"],
        spare_webhook=hooks[1]["id"],
        delivery=listed(owner, f"/v1/webhook_endpoints/{hooks[0]['id']}/deliveries")[0]["id"],
        sweep=sweep,
    )


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Scene]:
    """A's objects, made once: a database of the module's own, so nothing here reaches other tests."""
    with fresh_postgres_database() as url:
        settings = Settings(
            data_dir=tmp_path_factory.mktemp("isolation"),
            database_url=url,
            heartbeat_seconds=0.5,
            inference_url="http://127.0.0.1:9",  # nothing listens: A's inference is a 503, after resolving
        )
        engine = make_engine(url)
        factory = make_session_factory(engine)
        with session_scope(factory) as session:
            ModelRegistry(session).register(MODEL, str(tiny_model_dir), "local")
        alpha, bravo = make_tenant(factory, "alpha-team"), make_tenant(factory, "bravo-team")
        app = create_app(settings, RecordingDispatcher())
        runner = JobRunner(settings, factory, LocalArtifactStore(settings.artifacts_root))
        # One lifespan for the app (its exit closes the engine); the second client just sends requests.
        with TestClient(app, raise_server_exceptions=False, headers=alpha.headers) as owner:
            stranger = TestClient(app, raise_server_exceptions=False, headers=bravo.headers)
            bravo_file = upload(stranger, name="bravo.jsonl").json()["id"]
            bravo_job = create(stranger, None, MODEL, bravo_file).json()["id"]
            hook = stranger.post("/v1/webhook_endpoints", json={"url": "https://hooks.bravo.example/"}).json()
            alpha_objects = make_alpha(owner, runner, alpha)
            yield Scene(app, owner, stranger, alpha_objects, bravo_file, bravo_job, hook["id"])
        engine.dispose()


@dataclass(frozen=True)
class Probe:
    """One request naming one of A's objects, `value`, in its path, query or body."""

    path: str
    value: str
    owner: int | None
    """What A's own key gets: the positive control. None where that would destroy an object other rows
    need, or where the request is not all A's (a cursor into B's own job)."""
    query: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    stranger: int = 404
    """What B gets: 404, or the 400 the service gives for an unknown file or cursor, as for any id."""

    def naming(self, other: str) -> "Probe":
        """The same request naming `other` instead of A's object."""

        def swap(text: str) -> str:
            return text.replace(self.value, other)

        body = json.loads(swap(json.dumps(self.body))) if self.body is not None else None
        query = {key: swap(value) for key, value in self.query.items()}
        return replace(self, path=swap(self.path), value=other, query=query, body=body)

    def send(self, client: TestClient, method: str) -> httpx.Response:
        return client.request(method, self.path, params=self.query, json=self.body)


def path_probes(template: str, values: list[str], owner: int | None) -> list[Probe]:
    return [Probe(template.format(value), value, owner) for value in values]


def cursor_probes(path: str, values: list[str], owner: int | None) -> list[Probe]:
    return [Probe(path, value, owner, query={"after": value}, stranger=400) for value in values]


def model_probes(path: str, body: dict[str, Any], models: list[str], owner: int) -> list[Probe]:
    return [Probe(path, model, owner, body={**body, "model": model}) for model in models]


def job_probes(action: str, owner: int | None, jobs: list[str]) -> list[Probe]:
    return path_probes(f"/v1/fine_tuning/jobs/{{}}/{action}", jobs, owner)


def _delete_files(s: Scene) -> list[Probe]:
    a = s.alpha
    in_use = path_probes("/v1/files/{}", [a.training_file, a.validation_file], 400)  # file_in_use
    return in_use + path_probes("/v1/files/{}", [a.results_file], None)


def _job_request(path: str, owner: int) -> Callable[[Scene], list[Probe]]:
    """A job request (job creation, the pre-flight estimate) naming A's files; A's own gets `owner`."""

    def probes(s: Scene) -> list[Probe]:
        a = s.alpha
        training = Probe(path, a.training_file, owner, stranger=400)
        validation = Probe(path, a.validation_file, None, stranger=400)
        return [
            replace(training, body={"model": MODEL, "training_file": a.training_file}),
            # B's own training file with A's validation file: A can't send B's file, so no control.
            replace(
                validation,
                body={"model": MODEL, "training_file": s.bravo_file, "validation_file": a.validation_file},
            ),
        ]

    return probes


def _sweep_request(s: Scene) -> list[Probe]:
    """A sweep naming A's files: B's is the 400 of an unknown file, as a job's is."""
    a = s.alpha
    training = Probe("/v1/fine_tuning/sweeps", a.training_file, 200, stranger=400)
    validation = Probe("/v1/fine_tuning/sweeps", a.validation_file, None, stranger=400)
    return [
        replace(training, body=sweep_body(a.training_file, a.validation_file)),
        # B's own training file with A's validation file: A can't send B's file, so no control.
        replace(validation, body=sweep_body(s.bravo_file, a.validation_file)),
    ]


def _events(s: Scene) -> list[Probe]:
    a = s.alpha
    mine = job_probes("events", 200, [a.job, a.paused_job])
    return mine + cursor_probes(f"/v1/fine_tuning/jobs/{s.bravo_job}/events", [a.event], None)


def _checkpoints(s: Scene) -> list[Probe]:
    a = s.alpha
    mine = job_probes("checkpoints", 200, [a.job, a.paused_job])
    return mine + cursor_probes(f"/v1/fine_tuning/jobs/{s.bravo_job}/checkpoints", [a.checkpoint_id], None)


def _downloads(s: Scene) -> list[Probe]:
    a = s.alpha
    adapters = path_probes("/v1/models/{}/content", [a.tuned, a.checkpoint], 200)
    merged = replace(path_probes("/v1/models/{}/content", [a.tuned], 200)[0], query={"format": "merged"})
    return [*adapters, merged]


def _inference(path: str, body: dict[str, Any]) -> Callable[[Scene], list[Probe]]:
    # A resolves its model, then finds no inference server: 503. B must not get as far.
    return lambda s: model_probes(path, body, [s.alpha.tuned, s.alpha.checkpoint], 503)


MATRIX: dict[Route, Callable[[Scene], list[Probe]]] = {
    ("GET", "/v1/files"): lambda s: cursor_probes("/v1/files", s.alpha.files, 200),
    ("GET", "/v1/files/{file_id}"): lambda s: path_probes("/v1/files/{}", s.alpha.files, 200),
    ("DELETE", "/v1/files/{file_id}"): _delete_files,
    ("GET", "/v1/files/{file_id}/content"): lambda s: path_probes("/v1/files/{}/content", s.alpha.files, 200),
    ("POST", "/v1/fine_tuning/jobs"): _job_request("/v1/fine_tuning/jobs", 200),
    # A's files resolve, then no inference server answers the pre-flight estimate: 503.
    ("POST", "/v1/fine_tuning/preflight"): _job_request("/v1/fine_tuning/preflight", 503),
    ("GET", "/v1/fine_tuning/jobs"): lambda s: cursor_probes(
        "/v1/fine_tuning/jobs", [s.alpha.job, s.alpha.paused_job], 200
    ),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"): lambda s: path_probes(
        "/v1/fine_tuning/jobs/{}", [s.alpha.job, s.alpha.paused_job], 200
    ),
    # A's controls are the state errors (400): the succeeded job can't be cancelled, paused or resumed, the
    # paused one can't be paused again. B's cancel and resume of the paused job have no control: they'd
    # change it.
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"): lambda s: [
        *job_probes("cancel", 400, [s.alpha.job]),
        *job_probes("cancel", None, [s.alpha.paused_job]),
    ],
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause"): lambda s: job_probes(
        "pause", 400, [s.alpha.job, s.alpha.paused_job]
    ),
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume"): lambda s: [
        *job_probes("resume", 400, [s.alpha.job]),
        *job_probes("resume", None, [s.alpha.paused_job]),
    ],
    ("POST", "/v1/fine_tuning/sweeps"): _sweep_request,
    ("GET", "/v1/fine_tuning/sweeps"): lambda s: cursor_probes(
        "/v1/fine_tuning/sweeps", [s.alpha.sweep], 200
    ),
    ("GET", "/v1/fine_tuning/sweeps/{sweep_id}"): lambda s: path_probes(
        "/v1/fine_tuning/sweeps/{}", [s.alpha.sweep], 200
    ),
    ("POST", "/v1/fine_tuning/sweeps/{sweep_id}/cancel"): lambda s: path_probes(
        "/v1/fine_tuning/sweeps/{}/cancel", [s.alpha.sweep], 400
    ),
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"): _events,
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"): _checkpoints,
    ("GET", "/v1/models/{model:path}"): lambda s: path_probes(
        "/v1/models/{}", [s.alpha.tuned, s.alpha.checkpoint], 200
    ),
    ("GET", "/v1/models/{model:path}/content"): _downloads,
    ("DELETE", "/v1/models/{model:path}"): lambda s: [
        *path_probes("/v1/models/{}", [s.alpha.spare_checkpoint], 200),
        *path_probes("/v1/models/{}", [s.alpha.tuned], None),
    ],
    ("POST", "/v1/chat/completions"): _inference("/v1/chat/completions", {"messages": CHAT}),
    ("POST", "/v1/completions"): _inference("/v1/completions", {"prompt": "hi"}),
    ("POST", "/v1/classifications"): _inference("/v1/classifications", {"input": ["hi"]}),
    ("GET", "/v1/webhook_endpoints"): lambda s: cursor_probes(
        "/v1/webhook_endpoints", [s.alpha.webhook], 200
    ),
    ("GET", WEBHOOK): lambda s: path_probes("/v1/webhook_endpoints/{}", [s.alpha.webhook], 200),
    ("POST", WEBHOOK): lambda s: [
        replace(probe, body={"name": "renamed"})
        for probe in path_probes("/v1/webhook_endpoints/{}", [s.alpha.webhook], 200)
    ],
    ("DELETE", WEBHOOK): lambda s: [
        *path_probes("/v1/webhook_endpoints/{}", [s.alpha.spare_webhook], 200),
        *path_probes("/v1/webhook_endpoints/{}", [s.alpha.webhook], None),
    ],
    ("POST", f"{WEBHOOK}/rotate_secret"): lambda s: path_probes(
        "/v1/webhook_endpoints/{}/rotate_secret", [s.alpha.webhook], 200
    ),
    ("GET", f"{WEBHOOK}/deliveries"): lambda s: [
        *path_probes("/v1/webhook_endpoints/{}/deliveries", [s.alpha.webhook], 200),
        *cursor_probes(f"/v1/webhook_endpoints/{s.bravo_webhook}/deliveries", [s.alpha.delivery], None),
    ],
}
"""Every /v1 route that can name an object: what B sends, naming A's, and what A gets for the same."""

ELSEWHERE: dict[Route, str] = {
    ("POST", "/v1/files"): "test_idempotency_keys_are_per_organisation",
    ("GET", "/v1/models"): "test_lists_show_another_organisation_nothing_of_a",
    ("GET", "/v1/webhook_event_types"): "test_lists_show_another_organisation_nothing_of_a",
    ("POST", "/v1/webhook_endpoints"): "tests/test_webhooks.py::test_events_reach_only_subscribed_endpoints_"
    "of_the_jobs_organisation",
    ("POST", "/v1/fine_tuning/alpha/graders/validate"): "test_a_grader_cannot_name_a_judge_model_of_a",
    ("POST", "/v1/fine_tuning/alpha/graders/run"): "test_a_grader_cannot_name_a_judge_model_of_a",
}
"""Routes that name nothing of A's, and the test that covers them."""


def v1_routes(app: FastAPI) -> set[Route]:
    """Every (method, path) the app serves under /v1, but the admin routes (the admin key's, no org's).

    FastAPI 0.137+ keeps an included router as one node of `app.routes`; `iter_route_contexts` (0.137.2+)
    flattens them. Older versions list the routes themselves."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = [(c.original_route, c.path) for c in flatten(app.routes)] if flatten else []
    routes = routes or [(route, getattr(route, "path", "")) for route in app.routes]
    return {
        (method, path)
        for route, path in routes
        if isinstance(route, APIRoute) and path.startswith("/v1/") and not path.startswith("/v1/admin")
        for method in route.methods
    }


def envelope(response: httpx.Response) -> dict[str, Any]:
    """OpenAI's error envelope, and nothing else."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


def leaks(alpha: Alpha, response: httpx.Response, asked: str = "") -> set[str]:
    """A's secrets in a response (body and headers), but for `asked` echoed in the error message."""
    shown = response.text
    if asked:
        error = envelope(response)
        shown = json.dumps({**error, "message": error["message"].replace(asked, "")})
    shown += " ".join(f"{name}: {value}" for name, value in response.headers.items())
    return {secret for secret in alpha.secrets if secret in shown}


def test_the_matrix_covers_every_route(scene: Scene) -> None:
    served = v1_routes(scene.app)
    assert ("POST", "/v1/files") in served and ("GET", "/v1/files/{file_id}") in served  # not vacuous
    assert served - MATRIX.keys() - ELSEWHERE.keys() == set(), "routes with no isolation row"
    assert (MATRIX.keys() | ELSEWHERE.keys()) - served == set(), "rows for routes the app no longer serves"
    assert not [path for _, path in ELSEWHERE if "{" in path], "a route naming an object needs a MATRIX row"


@pytest.mark.parametrize("route", list(MATRIX), ids=" ".join)
def test_another_organisation_gets_404_and_nothing_of_a(scene: Scene, route: Route) -> None:
    method, _ = route
    probes = MATRIX[route](scene)
    assert probes
    for probe in probes:
        answer = probe.send(scene.stranger, method)
        where = f"{method} {probe.path} {probe.query} {probe.body}"
        assert answer.status_code == probe.stranger, f"{where}: {answer.status_code} {answer.text}"
        # "No data": exactly what an id that never existed gets, and none of A's secrets but the id echoed.
        absent = probe.naming(f"{probe.value}0").send(scene.stranger, method)
        assert answer.status_code == absent.status_code, where
        assert answer.json() == json.loads(absent.text.replace(f"{probe.value}0", probe.value)), where
        assert not leaks(scene.alpha, answer, asked=probe.value), where
        if probe.owner is not None:
            mine = probe.send(scene.owner, method)
            assert mine.status_code == probe.owner, f"{where} with A's key: {mine.status_code} {mine.text}"


def test_lists_show_another_organisation_nothing_of_a(scene: Scene) -> None:
    stranger, alpha = scene.stranger, scene.alpha
    for path, params in [
        ("/v1/files", {}),
        ("/v1/files", {"purpose": "fine-tune-results"}),
        ("/v1/files", {"order": "asc"}),
        ("/v1/fine_tuning/jobs", {}),
        ("/v1/fine_tuning/jobs", {f"metadata[{key}]": value for key, value in METADATA.items()}),
        ("/v1/models", {}),
        ("/v1/webhook_endpoints", {}),
        ("/v1/webhook_event_types", {}),
    ]:
        response = stranger.get(path, params=params)
        assert response.status_code == 200 and not leaks(alpha, response), (path, params, response.text)
    assert scene.bravo_file in {file["id"] for file in listed(stranger, "/v1/files")}
    assert [job["id"] for job in listed(stranger, "/v1/fine_tuning/jobs")] == [scene.bravo_job]
    assert [(m["id"], m["owned_by"]) for m in listed(stranger, "/v1/models")] == [(MODEL, "system")]
    # The same lists show A its own objects.
    assert {alpha.tuned, alpha.checkpoint} <= {model["id"] for model in listed(scene.owner, "/v1/models")}
    assert set(alpha.files) <= {file["id"] for file in listed(scene.owner, "/v1/files")}


def test_a_grader_cannot_name_a_judge_model_of_a(scene: Scene) -> None:
    # The graders routes refuse a judge model with a 400 naming the field (not the 404 of a path's id):
    # B gets for A's models exactly what it gets for a model that does not exist.
    def judge(model: str) -> dict[str, Any]:
        return {"type": "score_model", "name": "j", "model": model, "input": CHAT}

    for path, body in [("validate", {}), ("run", {"model_sample": "x"})]:
        url = f"/v1/fine_tuning/alpha/graders/{path}"
        missing = envelope(scene.stranger.post(url, json={**body, "grader": judge("ft:none:x:y:z")}))
        assert (missing["param"], missing["code"]) == ("grader.model", "model_not_found")
        for model in (scene.alpha.tuned, scene.alpha.checkpoint):
            response = scene.stranger.post(url, json={**body, "grader": judge(model)})
            assert response.status_code == 400 and not leaks(scene.alpha, response, asked=model), (
                response.text
            )
            assert envelope(response) == {
                **missing,
                "message": missing["message"].replace("ft:none:x:y:z", model),
            }
    # A may use its own model as a judge.
    mine = scene.owner.post(
        "/v1/fine_tuning/alpha/graders/validate", json={"grader": judge(scene.alpha.tuned)}
    )
    assert mine.status_code == 200, mine.text
    # A reinforcement job's grader likewise, at create.
    prompts_file = upload(scene.stranger, prompts(10), name="bravo-prompts.jsonl").json()["id"]

    def job(model: str) -> dict[str, Any]:
        method = {"type": "reinforcement", "reinforcement": {"grader": judge(model)}}
        return envelope(create(scene.stranger, None, MODEL, prompts_file, method=method))

    missing = job("ft:none:x:y:z")
    assert (missing["param"], missing["code"]) == ("method.reinforcement.grader.model", "model_not_found")
    assert job(scene.alpha.tuned) == {
        **missing,
        "message": missing["message"].replace("ft:none:x:y:z", scene.alpha.tuned),
    }


def test_idempotency_keys_are_per_organisation(scene: Scene) -> None:
    owner, stranger, alpha = scene.owner, scene.stranger, scene.alpha
    # A's job-create request again, with A's key: A gets its job back; B gets the 400 of an unknown file.
    mine = create(owner, JOB_KEY, MODEL, alpha.training_file, **alpha.job_body)
    assert mine.headers["idempotent-replayed"] == "true" and mine.json()["id"] == alpha.job
    theirs = create(stranger, JOB_KEY, MODEL, alpha.training_file, **alpha.job_body)
    assert theirs.status_code == 400 and "idempotent-replayed" not in theirs.headers, theirs.text
    assert envelope(theirs)["code"] == "file_not_found"
    assert not leaks(alpha, theirs, asked=alpha.training_file)
    pause = stranger.post(
        f"/v1/fine_tuning/jobs/{alpha.paused_job}/pause", headers={"Idempotency-Key": PAUSE_KEY}
    )
    assert pause.status_code == 404 and "idempotent-replayed" not in pause.headers, pause.text

    # An upload: B's first use of A's key stores B's own file; B's retry replays B's, never A's.
    first = upload_with_key(owner, FILE_KEY).json()
    again = upload_with_key(stranger, FILE_KEY)
    assert again.status_code == 200 and "idempotent-replayed" not in again.headers, again.text
    assert again.json()["id"] != first["id"]
    replayed = upload_with_key(stranger, FILE_KEY)
    assert replayed.headers["idempotent-replayed"] == "true" and replayed.json() == again.json()
    assert upload_with_key(owner, FILE_KEY).json() == first


def test_the_openai_client_gets_not_found(scene: Scene) -> None:
    api, alpha = openai_client(scene.stranger), scene.alpha
    jobs = api.fine_tuning.jobs
    calls: dict[str, Callable[[], object]] = {
        "files.retrieve": lambda: api.files.retrieve(alpha.training_file),
        "files.content": lambda: api.files.content(alpha.results_file),
        "files.delete": lambda: api.files.delete(alpha.results_file),
        "jobs.retrieve": lambda: jobs.retrieve(alpha.job),
        "jobs.cancel": lambda: jobs.cancel(alpha.paused_job),
        "jobs.list_events": lambda: jobs.list_events(alpha.job),
        "jobs.checkpoints.list": lambda: jobs.checkpoints.list(alpha.job),
        "models.retrieve": lambda: api.models.retrieve(alpha.tuned),
        "models.delete": lambda: api.models.delete(alpha.checkpoint),
        "chat.completions.create": lambda: api.chat.completions.create(model=alpha.checkpoint, messages=CHAT),  # type: ignore[arg-type]
        "completions.create": lambda: api.completions.create(model=alpha.tuned, prompt="hi"),
    }
    for name, call in calls.items():
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert missing.value.code == (
            "model_not_found" if name.endswith("completions.create") else "not_found"
        ), name
    assert {model.owned_by for model in api.models.list()} == {"system"}
    assert {file.id for file in api.files.list()}.isdisjoint(alpha.secrets)
    assert [job.id for job in jobs.list()] == [scene.bravo_job]
