"""Hyperparameter sweeps on real Postgres: bad input is a 400 naming the field, trials are real jobs run by
the runner, the driver picks the winner by the metric, stops a trial whose curve falls behind, and a cancel
keeps the finished trials."""

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.sweeps.service import ServiceTrialJobs, drive
from models.db import session_scope
from models.jobs import JobRepository
from models.settings import Settings
from models.storage import LocalArtifactStore
from models.sweeps import PRUNED_REASON, SweepRepository
from tests.conftest import RecordingDispatcher, make_tenant
from tests.jobs_helpers import chat_lines
from tests.test_runner import FAST, upload
from worker.runner import JobRunner

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


def base(client: TestClient, model: str, **hyper: object) -> dict[str, Any]:
    return {
        "model": model,
        "seed": 7,
        "training_file": upload(client, chat_lines(12)),
        "validation_file": upload(client, chat_lines(4, "validation")),
        "method": {"type": "supervised", "supervised": {"hyperparameters": {**FAST, **hyper}}},
    }


def driver(settings: Settings, factory: sessionmaker[Session], dispatcher: RecordingDispatcher) -> list[str]:
    store = LocalArtifactStore(settings.artifacts_root)
    return drive(factory, ServiceTrialJobs(settings, store, dispatcher))


BAD = [
    pytest.param({"search_space": {"lora_rx": [4]}}, "search_space.lora_rx", id="unknown-knob"),
    pytest.param({"search_space": {"lora_r": []}}, "search_space.lora_r", id="empty-list"),
    pytest.param({"search_space": {"lora_r": [0]}}, "search_space.lora_r[0]", id="out-of-bounds"),
    pytest.param(
        {"search_space": {"n_epochs": {"low": 2, "high": 2}}}, "search_space.n_epochs", id="empty-range"
    ),
    pytest.param(
        {"search_space": {"learning_rate_multiplier": {"low": 2, "high": 1}}},
        "search_space.learning_rate_multiplier",
        id="low-above-high",
    ),
    pytest.param(
        {"search_space": {"training_type": ["full", "lora"], "lora_r": [4, 8]}},
        "search_space.lora_r",
        id="knob-a-training-type-does-not-take",
    ),
    pytest.param({"max_trials": 0}, "max_trials", id="no-trials"),
    pytest.param({"max_trials": 3}, "max_trials", id="more-trials-than-a-grid-has-points"),
    pytest.param({"max_trials": 17}, "max_trials", id="over-the-active-job-cap"),
    pytest.param({"validation_file": None}, "validation_file", id="no-validation-file"),
]


@pytest.mark.parametrize(("change", "param"), BAD)
def test_bad_sweeps_are_400s_naming_the_field(
    client: TestClient, registered_model: str, change: dict[str, Any], param: str
) -> None:
    body = {**base(client, registered_model), "search_space": {"lora_r": [4, 8]}, "max_trials": 2, **change}
    response = client.post("/v1/fine_tuning/sweeps", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert client.get("/v1/fine_tuning/sweeps").json()["data"] == []
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_a_sweep_runs_its_trials_as_jobs_and_picks_the_winner(
    client: TestClient,
    registered_model: str,
    settings: Settings,
    session_factory: sessionmaker[Session],
    dispatcher: RecordingDispatcher,
) -> None:
    body = {
        **base(client, registered_model),
        "search_space": {"learning_rate_multiplier": {"low": 0.5, "high": 20.0, "log": True}},
        "max_trials": 3,
        "parallelism": 3,
    }
    response = client.post("/v1/fine_tuning/sweeps", json=body)
    assert response.status_code == 200, response.text
    sweep = response.json()
    assert sweep["object"] == "fine_tuning.sweep" and sweep["status"] == "running"
    trials = [trial["job_id"] for trial in sweep["trials"]]
    assert len(trials) == 3 and dispatcher.submitted == trials  # woken like any job
    listed = {job["id"] for job in client.get("/v1/fine_tuning/jobs").json()["data"]}
    assert listed == set(trials)
    rates = [trial["params"]["learning_rate_multiplier"] for trial in sweep["trials"]]
    assert len(set(rates)) == 3 and all(0.5 <= rate <= 20.0 for rate in rates)

    runner = JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root))
    for job_id in trials:
        runner.run(job_id)
    assert driver(settings, session_factory, dispatcher) == [sweep["id"]]

    done = client.get(f"/v1/fine_tuning/sweeps/{sweep['id']}").json()
    assert done["status"] == "succeeded" and done["finished_at"] is not None
    assert done["metric"] == "full_valid_loss" and done["direction"] == "minimize"
    jobs = {job_id: client.get(f"/v1/fine_tuning/jobs/{job_id}").json() for job_id in trials}
    assert all(job["status"] == "succeeded" for job in jobs.values())
    # Each trial's value is the metric of what it published (its best checkpoint).
    values = {job_id: job["evaluation"]["best_checkpoint"]["value"] for job_id, job in jobs.items()}
    assert {trial["job_id"]: trial["value"] for trial in done["trials"]} == values
    winner = min(values, key=lambda job_id: values[job_id])
    assert done["best"]["job_id"] == winner and done["best"]["value"] == values[winner]
    assert done["best"]["fine_tuned_model"] == jobs[winner]["fine_tuned_model"]
    assert client.get("/v1/fine_tuning/sweeps").json()["data"][0]["id"] == sweep["id"]


def test_a_trial_falling_behind_is_stopped_early_and_cancel_keeps_finished_trials(
    client: TestClient,
    registered_model: str,
    settings: Settings,
    session_factory: sessionmaker[Session],
    dispatcher: RecordingDispatcher,
) -> None:
    body = {
        **base(client, registered_model, eval_steps=1),
        "search_space": {"lora_r": [4, 8, 16]},
        "max_trials": 3,
        "parallelism": 1,
    }
    sweep = client.post("/v1/fine_tuning/sweeps", json=body).json()
    [first] = [trial["job_id"] for trial in sweep["trials"]]
    JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root)).run(first)
    driver(settings, session_factory, dispatcher)
    url = f"/v1/fine_tuning/sweeps/{sweep['id']}"
    second = client.get(url).json()["trials"][1]["job_id"]

    # The second trial reports an evaluation curve far worse than the first's at the same evaluations.
    with session_scope(session_factory) as session:
        for step in (1, 2):
            data = {"step": step, "full_valid_loss": 100.0}
            JobRepository(session).add_event(second, "Step", type="metrics", data=data)
    driver(settings, session_factory, dispatcher)
    stopped = client.get(f"/v1/fine_tuning/jobs/{second}").json()
    assert stopped["status"] == "cancelled"
    events = client.get(f"/v1/fine_tuning/jobs/{second}/events").json()["data"]
    assert events[0]["message"] == PRUNED_REASON
    now = client.get(url).json()
    assert [trial["pruned"] for trial in now["trials"]] == [False, True, False]
    # A space of lists only is a grid: each point once, in the order given (a pruned one counts as tried).
    assert [trial["params"]["lora_r"] for trial in now["trials"]] == [4, 8, 16]
    third = now["trials"][2]["job_id"]  # the pruned trial's place went to a new one

    other = make_tenant(session_factory, "other")
    assert client.get(url, headers=other.headers).status_code == 404
    assert client.post(f"{url}/cancel", headers=other.headers).status_code == 404

    cancelled = client.post(f"{url}/cancel").json()
    assert cancelled["status"] == "cancelled"
    statuses = {trial["job_id"]: trial["status"] for trial in cancelled["trials"]}
    assert statuses == {first: "succeeded", second: "cancelled", third: "cancelled"}
    assert cancelled["best"]["job_id"] == first
    assert client.post(f"{url}/cancel").status_code == 400


def test_a_sweep_another_driver_holds_is_skipped(
    client: TestClient,
    registered_model: str,
    settings: Settings,
    session_factory: sessionmaker[Session],
    dispatcher: RecordingDispatcher,
) -> None:
    body = {**base(client, registered_model), "search_space": {"lora_r": [4, 8]}, "max_trials": 2}
    sweep = client.post("/v1/fine_tuning/sweeps", json={**body, "parallelism": 1}).json()
    with session_scope(session_factory) as session:
        assert SweepRepository(session).lock(sweep["id"], wait=False) is not None
        assert driver(settings, session_factory, dispatcher) == []  # the row is held: nothing advanced
    with session_scope(session_factory) as session:
        JobRepository(session).get(sweep["trials"][0]["job_id"]).status = "cancelled"  # type: ignore[union-attr]
    assert driver(settings, session_factory, dispatcher) == [sweep["id"]]
    assert len(client.get(f"/v1/fine_tuning/sweeps/{sweep['id']}").json()["trials"]) == 2
