"""The trackers of worker/training/trackers.py fed from a real EventWriter, without training (the job-level
run through the API is tests/test_integrations.py): how each attempt's end reaches each tracker, how a later
attempt continues the same run, and how a tracker that fails is dropped with one warning."""

import os
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from models.spec import (
    ChildMessage,
    CompletedMessage,
    EvaluationMessage,
    LogMessage,
    MetricsMessage,
    StoppedMessage,
    TrainingSpec,
)
from tests.tracker_readers import mlflow_runs, tensorboard_run, wandb_run
from worker.training.events import EventWriter
from worker.training.trackers import Trackers

JOB_ID = "ftjob-trackers"
HYPERPARAMETERS = {
    "n_epochs": 2,
    "batch_size": 4,
    "learning_rate_multiplier": 1.0,
    "learning_rate": 2e-4,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "v_proj"],
    "max_seq_length": 128,
    "warmup_ratio": 0.1,
}


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")


def make_spec(root: Path, tensorboard_dir: Path | None = None) -> TrainingSpec:
    trackers = [
        {
            "type": "wandb",
            "project": "sentiment",
            "tags": ["a"],
            "run_id": JOB_ID,
            "dir": str(root / "wandb"),
        },
        {
            "type": "mlflow",
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "experiment_name": "org/sentiment",
            "run_name": "first",
            "tags": {"team": "nlp"},
        },
        {"type": "tensorboard", "log_dir": str(tensorboard_dir or root / "tensorboard")},
    ]
    return TrainingSpec.model_validate(
        {
            "job_id": JOB_ID,
            "base_model_path": str(root / "base"),
            "training_file": str(root / "train.jsonl"),
            "data_format": "chat",
            "objective": "sft",
            "output_dir": str(root / "out"),
            "stop_file": str(root / "STOP"),
            "seed": 1,
            "hyperparameters": HYPERPARAMETERS,
            "trackers": trackers,
        }
    )


class Attempt:
    """One child's event stream, written to a file the test reads back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events = EventWriter(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))

    def steps(self, *steps: tuple[int, float]) -> None:
        for step, loss in steps:
            self.events.emit(
                MetricsMessage(step=step, total_steps=5, metrics={"train_loss": loss}, elapsed_seconds=1)
            )

    def messages(self) -> list[ChildMessage]:
        adapter: TypeAdapter[ChildMessage] = TypeAdapter(ChildMessage)
        return [adapter.validate_json(line) for line in self.path.read_text().splitlines()]

    def warnings(self) -> list[str]:
        return [m.message for m in self.messages() if isinstance(m, LogMessage) and m.level == "warn"]


def test_every_attempt_reaches_each_tracker_and_a_later_one_continues_the_run(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    uri, experiment = f"sqlite:///{tmp_path / 'mlflow.db'}", "org/sentiment"

    first = Attempt(tmp_path / "attempt-1.jsonl")
    with pytest.raises(RuntimeError), Trackers(spec, first.events):
        first.events.emit(EvaluationMessage(step=0, baseline=True, metrics={"full_valid_loss": 3.0}))
        first.steps((1, 2.5), (2, 2.25))
        raise RuntimeError("the trainer crashed")
    [run] = mlflow_runs(uri, experiment)
    assert run.status == "FAILED" and wandb_run(tmp_path / "wandb", JOB_ID).exit_code == 1

    second = Attempt(tmp_path / "attempt-2.jsonl")  # resumed from the checkpoint of step 1
    with Trackers(spec, second.events):
        second.steps((2, 2.0), (3, 1.75))
        second.events.emit(StoppedMessage(step=3))  # paused
    [run] = mlflow_runs(uri, experiment)
    assert run.status == "KILLED"

    third = Attempt(tmp_path / "attempt-3.jsonl")
    with Trackers(spec, third.events):
        third.steps((4, 1.5), (5, 1.25))
        third.events.emit(
            CompletedMessage(step=5, adapter_path="a", results_csv="r", trained_tokens=1, metrics={})
        )
    assert first.warnings() == second.warnings() == third.warnings() == []

    [run] = mlflow_runs(uri, experiment)  # one run for the job, across its attempts
    assert run.status == "FINISHED" and run.name == "first"
    assert run.tags["team"] == "nlp" and run.tags["ftjobs.job_id"] == JOB_ID
    assert run.params == {name: str(value) for name, value in spec.hyperparameters.model_dump().items()}
    assert run.curves["full_valid_loss"] == {0: 3.0}
    assert set(run.curves["train_loss"]) == {1, 2, 3, 4, 5}  # step 2 twice: MLflow keeps both values

    curves, hparams = tensorboard_run(tmp_path / "tensorboard")
    # The second attempt purged the first one's step 2, logged after the checkpoint it resumed from.
    assert curves["train_loss"] == {1: 2.5, 2: 2.0, 3: 1.75, 4: 1.5, 5: 1.25}
    assert curves["full_valid_loss"] == {0: 3.0}
    assert hparams["lora_target_modules"] == "['q_proj', 'v_proj']" and hparams["lora_r"] == 8

    wandb = wandb_run(tmp_path / "wandb", JOB_ID)
    assert (wandb.run_id, wandb.project, wandb.tags, wandb.exit_code) == (JOB_ID, "sentiment", ["a"], 0)
    assert wandb.config == spec.hyperparameters.model_dump()
    assert wandb.curves["train_loss"] == {1: 2.5, 2: 2.0, 3: 1.75, 4: 1.5, 5: 1.25}


def test_a_tracker_that_fails_is_dropped_with_one_warning_and_the_others_go_on(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    attempt = Attempt(tmp_path / "events.jsonl")
    with Trackers(make_spec(tmp_path, tensorboard_dir=not_a_directory / "tensorboard"), attempt.events):
        attempt.steps((1, 2.0), (2, 1.0))
    [warning] = attempt.warnings()
    assert warning.startswith("The TensorBoard integration could not start and is off for the rest of this")
    assert "NotADirectoryError" in warning
    [run] = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "org/sentiment")
    assert run.curves["train_loss"] == {1: 2.0, 2: 1.0} and run.status == "FAILED"  # no CompletedMessage

    # Failing later, when it first logs: dropped too, with one warning however many steps follow.
    (tmp_path / "later").mkdir()
    spec = make_spec(tmp_path / "later", tensorboard_dir=tmp_path / "later" / "tensorboard")
    attempt = Attempt(tmp_path / "later-events.jsonl")
    with Trackers(spec, attempt.events):
        (tmp_path / "later" / "tensorboard").rmdir()
        (tmp_path / "later" / "tensorboard").write_text("now a file")
        attempt.steps((1, 2.0), (2, 1.0), (3, 0.5))
    [warning] = attempt.warnings()
    assert warning.startswith("The TensorBoard integration could not log and is off")
    assert wandb_run(tmp_path / "later" / "wandb", JOB_ID).curves["train_loss"] == {1: 2.0, 2: 1.0, 3: 0.5}
