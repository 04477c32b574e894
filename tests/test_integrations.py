"""Jobs' `integrations` through the official openai client: W&B (offline), MLflow and TensorBoard are
accepted, validated and echoed; a real job logs its resolved hyperparameters and exactly its own metric
curves to all three; a tracker that cannot start leaves the job succeeding with a warning."""

import io
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from models.db import session_scope
from models.jobs import JobRepository
from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.jobs_helpers import chat_lines
from tests.test_api_files import assert_error
from tests.test_api_models import openai_client
from tests.test_runner import FAST, runner  # noqa: F401 (runner: a fixture)
from tests.tracker_readers import Curves, mlflow_runs, tensorboard_run, wandb_run
from worker.runner import JobRunner

ALL_THREE = [
    {
        "type": "wandb",
        "wandb": {"project": "sentiment", "name": "first try", "entity": "acme", "tags": ["lora", "tiny"]},
    },
    {
        "type": "mlflow",
        "mlflow": {"experiment_name": "sentiment", "run_name": "first", "tags": {"team": "nlp"}},
    },
    {"type": "tensorboard", "tensorboard": {}},
]


def create(
    client: TestClient, model: str, integrations: list[dict[str, Any]], *, validation: bool = False
) -> Any:
    """A job through the openai client: the client's own `integrations` parameter."""
    api = openai_client(client)
    train = api.files.create(file=("train.jsonl", io.BytesIO(chat_lines(12))), purpose="fine-tune")
    valid = None
    if validation:
        valid = api.files.create(
            file=("valid.jsonl", io.BytesIO(chat_lines(4, "validation"))), purpose="fine-tune"
        )
    return api.fine_tuning.jobs.create(
        model=model,
        training_file=train.id,
        validation_file=valid.id if valid else openai.NOT_GIVEN,
        integrations=integrations,  # type: ignore[arg-type] (mlflow and tensorboard are our extensions)
        method={"type": "supervised", "supervised": {"hyperparameters": FAST}},  # type: ignore[typeddict-item]
    )


def test_integrations_are_accepted_and_echoed(client: TestClient, registered_model: str) -> None:
    job = create(client, registered_model, ALL_THREE)
    expected = [
        {"type": "wandb", "wandb": {**ALL_THREE[0]["wandb"], "run_id": job.id}},  # OpenAI's run id: the job's
        ALL_THREE[1],
        ALL_THREE[2],
    ]
    assert [integration.to_dict() for integration in job.integrations] == expected
    retrieved = openai_client(client).fine_tuning.jobs.retrieve(job.id)
    assert [integration.to_dict() for integration in retrieved.integrations] == expected

    # The settings objects are optional where nothing must be named.
    bare = create(client, registered_model, [{"type": "mlflow"}, {"type": "tensorboard"}])
    assert [integration.to_dict() for integration in bare.integrations] == [
        {"type": "mlflow", "mlflow": {"experiment_name": None, "run_name": None, "tags": None}},
        {"type": "tensorboard", "tensorboard": {}},
    ]


def wandb(**fields: Any) -> list[dict[str, Any]]:
    return [{"type": "wandb", "wandb": {"project": "p", **fields}}]


def mlflow(**fields: Any) -> list[dict[str, Any]]:
    return [{"type": "mlflow", "mlflow": fields}]


BAD = [
    pytest.param([{"type": "comet"}], "integrations.0.type", id="unknown-type"),
    pytest.param(wandb(project="x" * 129), "integrations.0.wandb.project", id="long-project"),
    pytest.param(wandb(project="a/../b"), "integrations.0.wandb.project", id="project-path"),
    pytest.param(wandb(entity="a:b"), "integrations.0.wandb.entity", id="entity-colon"),
    pytest.param(wandb(name="a\nb"), "integrations.0.wandb.name", id="name-newline"),
    pytest.param(wandb(tags=["t"] * 21), "integrations.0.wandb.tags", id="many-tags"),
    pytest.param(wandb(tags=["x" * 65]), "integrations.0.wandb.tags.0", id="long-tag"),
    pytest.param(wandb(run_id="someone-elses"), "integrations.0.wandb.run_id", id="wandb-run-id"),
    pytest.param([{"type": "wandb"}], "integrations.0", id="wandb-without-project"),
    pytest.param([{"type": "mlflow", "wandb": {"project": "p"}}], "integrations.0", id="other-type-object"),
    pytest.param(
        mlflow(tracking_uri="http://169.254.169.254/"), "integrations.0.mlflow.tracking_uri", id="ssrf"
    ),
    pytest.param(mlflow(experiment_name="\0"), "integrations.0.mlflow.experiment_name", id="nul"),
    pytest.param(
        mlflow(tags={"mlflow.user": "root"}), "integrations.0.mlflow.tags.mlflow.user", id="system-tag"
    ),
    pytest.param(mlflow(tags={"../x": "y"}), "integrations.0.mlflow.tags.../x", id="tag-path"),
    pytest.param(mlflow(tags={"a": "b" * 513}), "integrations.0.mlflow.tags.a", id="long-tag-value"),
    pytest.param(
        [{"type": "tensorboard", "tensorboard": {"log_dir": "/etc"}}],
        "integrations.0.tensorboard.log_dir",
        id="tensorboard-dir",
    ),
    pytest.param([{"type": "tensorboard"}] * 2, "integrations", id="same-type-twice"),
    pytest.param(wandb() * 6, "integrations", id="six"),
]


@pytest.mark.parametrize(("integrations", "param"), BAD)
def test_bad_integrations_are_refused(
    client: TestClient, registered_model: str, integrations: list[dict[str, Any]], param: str
) -> None:
    file_id = openai_client(client).files.create(file=io.BytesIO(chat_lines(12)), purpose="fine-tune").id
    body = {"model": registered_model, "training_file": file_id, "integrations": integrations}
    assert_error(client.post("/v1/fine_tuning/jobs", json=body), 400, param)


def test_the_openai_client_sees_the_400(client: TestClient, registered_model: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        create(client, registered_model, wandb(project="x" * 129))
    assert refused.value.param == "integrations.0.wandb.project"  # type: ignore[attr-defined]


def job_curves(client: TestClient, job_id: str) -> Curves:
    """The job's own metrics events (every step of a job this short), as metric → step → value."""
    curves: Curves = {}
    for event in openai_client(client).fine_tuning.jobs.list_events(job_id, limit=100):
        if event.type == "metrics":
            data = dict(event.data or {})
            step = int(data.pop("step"))
            data.pop("total_steps", None)
            for name, value in data.items():
                curves.setdefault(name, {})[step] = value
    return curves


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_job_logs_its_hyperparameters_and_curves_to_all_three(
    client: TestClient,
    runner: JobRunner,  # noqa: F811
    registered_model: str,
    settings: Settings,
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # the trainer inherits the worker's environment
    job = create(client, registered_model, ALL_THREE, validation=True)
    runner.run(job.id)
    done = client.get(f"/v1/fine_tuning/jobs/{job.id}").json()
    assert done["status"] == "succeeded", done["error"]
    with session_scope(session_factory) as session:
        row = JobRepository(session).get(job.id)
        assert row is not None and row.hyperparameters is not None
        resolved = row.hyperparameters.model_dump()  # all of them: the job echoes only its method's keys
    assert done["method"]["supervised"]["hyperparameters"].items() <= resolved.items()
    curves = job_curves(client, job.id)
    assert set(curves["train_loss"]) == {1, 2, 3} and set(curves["full_valid_loss"]) == {0, 3}  # baseline: 0
    events = openai_client(client).fine_tuning.jobs.list_events(job.id, limit=100)
    assert [event.message for event in events if event.level == "warn"] == []

    logged = wandb_run(settings.wandb_root / "local", job.id)  # one directory per organisation
    assert (logged.run_id, logged.project, logged.entity, logged.name) == (
        job.id,
        "sentiment",
        "acme",
        "first try",
    )
    assert logged.tags == ["lora", "tiny"] and logged.exit_code == 0
    assert logged.config == resolved
    assert logged.curves == curves

    [run] = mlflow_runs(settings.resolved_mlflow_tracking_uri(), "local/sentiment")  # the organisation's
    assert (run.status, run.name, run.tags["team"], run.tags["ftjobs.job_id"]) == (
        "FINISHED",
        "first",
        "nlp",
        job.id,
    )
    assert run.params == {name: str(value) for name, value in resolved.items()}
    assert run.curves == curves

    scalars, hparams = tensorboard_run(settings.tensorboard_root / "local" / job.id)
    assert scalars == {name: pytest.approx(curve, rel=1e-6) for name, curve in curves.items()}  # float32
    assert hparams == {
        name: value if isinstance(value, int | float | str) else str(value)
        for name, value in resolved.items()
    }


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_tracker_that_cannot_start_leaves_the_job_succeeding_with_a_warning(
    client: TestClient,
    registered_model: str,
    settings: Settings,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    broken = settings.model_copy(update={"tensorboard_dir": not_a_directory / "tensorboard"})
    job = create(client, registered_model, [{"type": "tensorboard"}])
    JobRunner(broken, session_factory, LocalArtifactStore(broken.artifacts_root)).run(job.id)
    done = openai_client(client).fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    warnings = [
        e.message for e in openai_client(client).fine_tuning.jobs.list_events(job.id) if e.level == "warn"
    ]
    assert len(warnings) == 1 and warnings[0].startswith("The TensorBoard integration could not start")
