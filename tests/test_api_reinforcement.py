"""Reinforcement jobs at the API: OpenAI's request shape is accepted and echoed so the openai client parses
it; a grader that cannot grade this job (an unknown judge model too) is a 400 at create naming the field;
a file that cannot train fails the job with the line and field, as every other file does, and a judge model
gone since create fails it naming the judge's field."""

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types.fine_tuning import FineTuningJob

from api.jobs.reinforcement import CHECKED_ROWS
from models.db import session_scope
from models.jobs import JobRepository
from models.registry import ModelRegistry
from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.test_api_files import assert_error, upload
from worker.runner import JobRunner

GRADER = {
    "type": "string_check",
    "name": "label",
    "input": "{{sample.output_text}}",
    "reference": "{{item.label}}",
    "operation": "eq",
}


def prompts(n: int, **extra: Any) -> bytes:
    rows = [
        {"messages": [{"role": "user", "content": f"Review {i}: great film."}], "label": "positive", **extra}
        for i in range(n)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def reinforcement(grader: dict[str, Any] | None = None, **hyperparameters: Any) -> dict[str, Any]:
    return {
        "type": "reinforcement",
        "reinforcement": {"grader": grader or GRADER, "hyperparameters": hyperparameters},
    }


def create(client: TestClient, model: str, content: bytes, method: dict[str, Any], **body: Any):  # type: ignore[no-untyped-def]
    training_file = upload(client, content).json()["id"]
    body = {"model": model, "training_file": training_file, "method": method, **body}
    return client.post("/v1/fine_tuning/jobs", json=body)


def test_the_method_is_accepted_and_echoed_in_openais_shape(
    client: TestClient, registered_model: str
) -> None:
    method = reinforcement(
        n_epochs=1,
        compute_multiplier=1.5,
        eval_interval=2,
        eval_samples=2,
        reasoning_effort="low",
        beta=0.05,
        max_completion_tokens=16,
        lora_r=4,
    )
    method["reinforcement"]["response_format"] = {"type": "json_object"}
    response = create(client, registered_model, prompts(10), method)
    assert response.status_code == 200, response.text
    job = FineTuningJob.model_validate(response.json())
    assert job.method is not None and job.method.type == "reinforcement"
    settings = job.method.reinforcement
    assert settings is not None and settings.grader.type == "string_check"
    assert settings.grader.model_dump(exclude_none=True) == GRADER
    echoed = settings.hyperparameters
    assert echoed is not None
    assert (echoed.compute_multiplier, echoed.eval_interval, echoed.eval_samples) == (1.5, 2, 2)
    assert echoed.reasoning_effort == "low"
    assert response.json()["method"]["reinforcement"]["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize(
    ("grader", "param", "code"),
    [
        # A template naming a field the file's rows do not have.
        ({**GRADER, "reference": "{{item.answer}}"}, "method.reinforcement.grader.reference", None),
        ({**GRADER, "input": "{{sample.text}}"}, "method.reinforcement.grader.input", "invalid_grader"),
        (
            {
                "type": "multi",
                "name": "m",
                "calculate_output": "label + open(1)",
                "graders": {"label": GRADER},
            },
            "method.reinforcement.grader.calculate_output",
            "invalid_grader",
        ),
        (
            {"type": "python", "name": "p", "source": "def grade(sample, item):\n  return (\n"},
            "method.reinforcement.grader.source",
            "invalid_grader",
        ),
        (
            {
                "type": "score_model",
                "name": "judge",
                "model": "someone-elses-model",
                "input": [{"role": "user", "content": "{{sample.output_text}}"}],
            },
            "method.reinforcement.grader.model",
            "model_not_found",
        ),
    ],
)
def test_a_grader_this_job_cannot_use_is_400_naming_the_field(
    client: TestClient, registered_model: str, grader: dict[str, Any], param: str, code: str | None
) -> None:
    error = assert_error(
        create(client, registered_model, prompts(10), reinforcement(grader)), 400, param, code
    )
    if "answer" in json.dumps(grader):
        assert "Line 1 of the training file" in error["message"]


def test_a_served_judge_model_is_accepted(client: TestClient, registered_model: str) -> None:
    """A model grader judging with a base the organisation can call (another organisation's model is
    refused as an unknown one: tests/test_isolation.py)."""
    judge = {
        "type": "label_model",
        "name": "judge",
        "model": registered_model,
        "input": [{"role": "user", "content": "Is {{sample.output_text}} {{item.label}}?"}],
        "labels": ["yes", "no"],
        "passing_labels": ["yes"],
    }
    grader = {"type": "multi", "name": "m", "calculate_output": "judge", "graders": {"judge": judge}}
    response = create(client, registered_model, prompts(10), reinforcement(grader))
    assert response.status_code == 200, response.text


def test_other_bad_requests(client: TestClient, registered_model: str) -> None:
    assert_error(
        create(client, registered_model, prompts(10), {"type": "reinforcement"}),
        400,
        "method.reinforcement.grader",
    )
    assert_error(
        create(client, registered_model, prompts(10), reinforcement(compute_multiplier=11)),
        400,
        "method.reinforcement.hyperparameters.compute_multiplier",
    )
    assert_error(
        create(client, registered_model, prompts(10), reinforcement(packing=True)),
        400,
        "method.reinforcement.hyperparameters.packing",
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # Past the rows checked at create: the job checks them all.
        (
            prompts(CHECKED_ROWS) + b'{"messages": [{"role": "user", "content": "hi"}]}\n',
            f"Line {CHECKED_ROWS + 1} has no field `label`",
        ),
        (
            prompts(10) + b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
            b'"content": "b"}], "label": "x"}\n',
            "The last message on line 11 has role `assistant`",
        ),
    ],
)
def test_the_job_checks_every_row_with_line_numbers(
    client: TestClient,
    registered_model: str,
    settings: Settings,
    session_factory,  # type: ignore[no-untyped-def]
    content: bytes,
    message: str,
) -> None:
    created = create(client, registered_model, content, reinforcement())
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root)).run(job_id)
    with session_scope(session_factory) as session:
        job = JobRepository(session).get(job_id)
        assert job is not None and job.status == "failed" and job.error is not None
        assert job.error["code"] == "invalid_example" and job.error["param"] == "training_file"
        assert message in job.error["message"]


def test_a_judge_gone_since_create_fails_the_job_naming_it(
    client: TestClient,
    registered_model: str,
    settings: Settings,
    session_factory,  # type: ignore[no-untyped-def]
    tiny_model_dir: Path,
) -> None:
    with session_scope(session_factory) as session:
        ModelRegistry(session).register("tiny-judge", str(tiny_model_dir), "local")
    judge = {
        "type": "score_model",
        "name": "j",
        "model": "tiny-judge",
        "input": [{"role": "user", "content": "-"}],
    }
    created = create(client, registered_model, prompts(10), reinforcement(judge))
    assert created.status_code == 200, created.text
    with session_scope(session_factory) as session:
        session.delete(ModelRegistry(session).get("tiny-judge"))
    JobRunner(settings, session_factory, LocalArtifactStore(settings.artifacts_root)).run(
        created.json()["id"]
    )
    with session_scope(session_factory) as session:
        job = JobRepository(session).get(created.json()["id"])
        assert job is not None and job.status == "failed" and job.error is not None
        assert (job.error["code"], job.error["param"]) == (
            "model_not_found",
            "method.reinforcement.grader.model",
        )


def test_the_preflight_estimate_refuses_reinforcement_jobs(client: TestClient, registered_model: str) -> None:
    training_file = upload(client, prompts(10)).json()["id"]
    body = {"model": registered_model, "training_file": training_file, "method": reinforcement()}
    assert_error(client.post("/v1/fine_tuning/preflight", json=body), 400, "method.type")
