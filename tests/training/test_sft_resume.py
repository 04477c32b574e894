"""Checkpoint and resume, with the recipe in this process (the child's start-up is paid for once, in
test_sft_run, which also resumes through the real child): a pause checkpoints before stopping, every method
resumes exactly, and checkpoints that are incomplete or belong to another job are refused.

Each run: 5 examples in batches of 2 for 2 epochs = 6 steps, checkpoints every 2 steps and at epoch ends:
2, 3, 4 and 6."""

import os
import shutil
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from safetensors.torch import load_file

from models.spec import (
    CheckpointMessage,
    ChildMessage,
    CompletedMessage,
    MetricsMessage,
    StoppedMessage,
    TrainingSpec,
)
from tests.training.test_sft_run import checkpoint_dir, make_spec, write_jsonl
from worker.training.checkpoint import writes_sharded
from worker.training.events import EventWriter
from worker.training.recipe import Recipe, run

N_TRAIN, STEPS, RESUME_AT, PAUSE_AFTER = 5, 6, 4, 1
METHODS = ["lora", "full", "freeze", "bitfit", "qlora", "p_tuning"]
"""LoRA (dropout), the whole model, some base tensors, added biases, a 4-bit base, a prompt encoder."""
T = TypeVar("T")


class Recorder(EventWriter):
    """Keeps the recipe's events; with `pause_after`, writes `pause` into the stop file as soon as that
    step's metrics are out, so the recipe pauses before the next step."""

    def __init__(self, spec: TrainingSpec, pause_after: int | None = None) -> None:
        super().__init__(os.open(os.devnull, os.O_WRONLY))
        self.stop_file, self.pause_after = Path(spec.stop_file), pause_after
        self.messages: list[ChildMessage] = []

    def emit(self, message: ChildMessage) -> None:
        super().emit(message)
        self.messages.append(message)
        if isinstance(message, MetricsMessage) and message.step == self.pause_after:
            self.stop_file.write_text("pause\n")

    def of_type(self, cls: type[T]) -> list[T]:
        return [message for message in self.messages if isinstance(message, cls)]


def method_spec(root: Path, name: str, base: Path, training_type: str, **fields: Any) -> TrainingSpec:
    train, valid = root / "train.jsonl", root / "valid.jsonl"
    if not train.exists():
        write_jsonl(train, N_TRAIN)
        write_jsonl(valid, 3, offset=100)
    spec = make_spec(root, name, base, train, valid)
    hp = spec.hyperparameters.model_copy(
        update={"training_type": training_type, "trainable_layers": 1, "num_virtual_tokens": 5}
    )
    return spec.model_copy(update={"hyperparameters": hp, "checkpoint_every_steps": 2, **fields})


def run_here(spec: TrainingSpec, pause_after: int | None = None) -> Recorder:
    events = Recorder(spec, pause_after)
    run(spec, events)
    return events


@pytest.fixture(scope="module", params=METHODS)
def runs(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[TrainingSpec, Recorder]]:
    """One method run whole; again from the whole run's step-RESUME_AT checkpoint; once more paused after
    step PAUSE_AFTER and resumed from that pause."""
    name: str = request.param
    root = tmp_path_factory.mktemp(f"resume-{name}")
    whole = method_spec(root, "whole", tiny_model_dir, name)
    resumed = method_spec(
        root, "resumed", tiny_model_dir, name, resume_from=str(checkpoint_dir(whole, RESUME_AT))
    )
    paused = method_spec(root, "paused", tiny_model_dir, name, checkpoint_every_steps=0)
    unpaused = method_spec(
        root, "unpaused", tiny_model_dir, name, resume_from=str(checkpoint_dir(paused, PAUSE_AFTER))
    )
    return {
        "whole": (whole, run_here(whole)),
        "resumed": (resumed, run_here(resumed)),
        "paused": (paused, run_here(paused, pause_after=PAUSE_AFTER)),
        "unpaused": (unpaused, run_here(unpaused)),
    }


def test_pause_saves_a_checkpoint_then_stops(runs: dict[str, tuple[TrainingSpec, Recorder]]) -> None:
    spec, paused = runs["paused"]
    assert [m.step for m in paused.of_type(MetricsMessage)] == [PAUSE_AFTER]
    *_, checkpoint, stopped = paused.messages
    assert stopped == StoppedMessage(step=PAUSE_AFTER)
    assert checkpoint == CheckpointMessage(
        step=PAUSE_AFTER,
        path=str(checkpoint_dir(spec, PAUSE_AFTER)),
        metrics=paused.of_type(MetricsMessage)[-1].metrics,
    )
    assert (checkpoint_dir(spec, PAUSE_AFTER) / "COMPLETE").is_file()
    assert not paused.of_type(CompletedMessage)


def test_checkpoints_land_on_the_interval_and_epoch_ends(
    runs: dict[str, tuple[TrainingSpec, Recorder]],
) -> None:
    _, whole = runs["whole"]
    assert [c.step for c in whole.of_type(CheckpointMessage)] == [2, 3, 4, 6]


@pytest.mark.parametrize("runs", ["lora"], indirect=True)
@pytest.mark.parametrize(
    ("resume", "pause_after", "stopped_at"),
    [(False, 2, 2), (False, None, 0), (True, None, RESUME_AT)],
    ids=["after-a-checkpoint", "before-the-first-step", "right-after-resuming"],
)
def test_a_pause_where_a_checkpoint_exists_saves_none(
    runs: dict[str, tuple[TrainingSpec, Recorder]],
    tmp_path: Path,
    resume: bool,
    pause_after: int | None,
    stopped_at: int,
) -> None:
    """The step's checkpoint (or, before any step, the untrained start) is already there to resume from."""
    spec, _ = runs["whole"]
    resume_from = str(checkpoint_dir(spec, RESUME_AT)) if resume else None
    spec = spec.model_copy(
        update={"output_dir": str(tmp_path), "stop_file": str(tmp_path / "STOP"), "resume_from": resume_from}
    )
    if pause_after is None:
        Path(spec.stop_file).write_text("pause")
    events = run_here(spec, pause_after)
    assert events.messages[-1] == StoppedMessage(step=stopped_at)
    assert [c.step for c in events.of_type(CheckpointMessage)] == ([2] if pause_after else [])
    expected = {f"step-{step}" for step in [2] if pause_after}
    assert {path.name for path in (tmp_path / "checkpoints").glob("*")} == expected


@pytest.mark.parametrize(("name", "step"), [("resumed", RESUME_AT), ("unpaused", PAUSE_AFTER)])
def test_a_resumed_run_ends_as_the_whole_run(
    runs: dict[str, tuple[TrainingSpec, Recorder]], name: str, step: int
) -> None:
    (whole_spec, whole), (spec, resumed) = runs["whole"], runs[name]
    assert [m.step for m in resumed.of_type(MetricsMessage)] == list(range(step + 1, STEPS + 1))
    [expected], [completed] = whole.of_type(CompletedMessage), resumed.of_type(CompletedMessage)
    assert completed.trained_tokens == expected.trained_tokens
    assert completed.metrics == pytest.approx(expected.metrics, rel=0, abs=1e-6)
    # Both last checkpoints hold the same artifact, trainable parameters, optimizer and RNG states.
    expected_dir, actual_dir = checkpoint_dir(whole_spec, STEPS), checkpoint_dir(spec, STEPS)
    files = sorted(str(path.relative_to(expected_dir)) for path in expected_dir.rglob("*.safetensors"))
    trainer_files = (
        {"trainer/sharded/shard-00001-model-00001-of-00001.safetensors"}  # full, freeze: any world size
        if writes_sharded(spec.hyperparameters.training_type)
        else {"trainer/trainable.safetensors", "trainer/optimizer.safetensors"}
    )
    assert trainer_files <= set(files)
    assert files == sorted(str(path.relative_to(actual_dir)) for path in actual_dir.rglob("*.safetensors"))
    for file in files:
        tensors, expected_tensors = load_file(actual_dir / file), load_file(expected_dir / file)
        assert tensors.keys() == expected_tensors.keys()
        for key, tensor in expected_tensors.items():
            torch.testing.assert_close(tensors[key], tensor, rtol=0, atol=1e-6, msg=f"{file}: {key}")


def test_resuming_from_the_last_step_only_publishes(
    runs: dict[str, tuple[TrainingSpec, Recorder]], tmp_path: Path
) -> None:
    """An attempt that died after the last checkpoint, while publishing, publishes the same."""
    spec, whole = runs["whole"]
    again = spec.model_copy(
        update={"output_dir": str(tmp_path / "out"), "resume_from": str(checkpoint_dir(spec, STEPS))}
    )
    events = run_here(again)
    assert not events.of_type(MetricsMessage) and not events.of_type(CheckpointMessage)
    [completed], [expected] = events.of_type(CompletedMessage), whole.of_type(CompletedMessage)
    assert (completed.step, completed.trained_tokens, completed.metrics) == (
        expected.step,
        expected.trained_tokens,
        expected.metrics,
    )
    assert (Path(again.output_dir) / "step_metrics.csv").read_text() == Path(expected.results_csv).read_text()


def setup_here(spec: TrainingSpec) -> None:
    Recipe(spec, Recorder(spec)).setup()


@pytest.mark.parametrize("runs", ["lora"], indirect=True)
def test_an_incomplete_checkpoint_is_refused(
    runs: dict[str, tuple[TrainingSpec, Recorder]], tmp_path: Path
) -> None:
    spec, _ = runs["whole"]
    copy = shutil.copytree(checkpoint_dir(spec, RESUME_AT), tmp_path / "step-4")
    (copy / "COMPLETE").unlink()
    resume = spec.model_copy(update={"output_dir": str(tmp_path / "out"), "resume_from": str(copy)})
    with pytest.raises(ValueError, match=rf"cannot resume from {copy}: not a complete checkpoint"):
        setup_here(resume)


@pytest.mark.parametrize(
    ("change", "difference"),
    [
        ({"seed": 8}, "seed 7 there, 8 here"),
        ({"n_epochs": 3}, "n_epochs 2 there, 3 here"),
        ({"batch_size": 3}, "batch_size 2 there, 3 here"),
        ({"training_file": N_TRAIN - 1}, f"n_train_examples {N_TRAIN} there, {N_TRAIN - 1} here"),
        ({"training_type": "dora"}, "training_type 'lora' there, 'dora' here"),
    ],
    ids=lambda value: next(iter(value)) if isinstance(value, dict) else "",
)
@pytest.mark.parametrize("runs", ["lora"], indirect=True)
def test_a_checkpoint_of_another_job_is_refused(
    runs: dict[str, tuple[TrainingSpec, Recorder]], tmp_path: Path, change: dict[str, Any], difference: str
) -> None:
    spec, _ = runs["whole"]
    checkpoint = checkpoint_dir(spec, RESUME_AT)
    fields: dict[str, Any] = {"output_dir": str(tmp_path / "out"), "resume_from": str(checkpoint)}
    if "seed" in change:
        fields |= change
    elif "training_file" in change:
        fields["training_file"] = str(write_jsonl(tmp_path / "train.jsonl", change["training_file"]))
    else:
        fields["hyperparameters"] = spec.hyperparameters.model_copy(update=change)
    with pytest.raises(
        ValueError, match=rf"cannot resume from {checkpoint}: it belongs to another job"
    ) as error:
        setup_here(spec.model_copy(update=fields))
    assert difference in str(error.value)
