"""A LoRA job on two CPU ranks (gloo), started as the runner starts it (`worker.child.TrainingProcess`,
which goes through `worker.training.launch`), against the same job on one rank: the data order and the
global batch do not depend on the world size, so the losses agree to float32 summation order.

Five children in two waves (each 2-rank run costs ~10 s on two cores): 1 rank, 2 ranks and 2 ranks
paused early at once; then the paused one resumed on 2 ranks and a mid-run checkpoint of the 2-rank job
resumed on 1 rank (checkpoints every 2 steps, and at epoch ends). LoRA dropout is 0: ranks draw dropout
masks from their own RNG streams, so with dropout the runs agree only statistically.
"""

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.spec import (
    CheckpointMessage,
    CompletedMessage,
    EvaluationMessage,
    LogMessage,
    MetricsMessage,
    StoppedMessage,
    TrainingSpec,
)
from tests.tiny_model import build_tiny_llama
from tests.training.test_sft_run import Run, checkpoint_dir, make_spec, write_jsonl
from worker.child import TrainingProcess

pytestmark = pytest.mark.distributed

N_TRAIN, N_VALID, BATCH_SIZE, EPOCHS = 15, 4, 4, 2
STEPS_PER_EPOCH = 4  # ceil(15 / 4): the last batch holds 3 examples, split 2 + 1 across the ranks
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
PAUSE_AFTER, RESUME_AT = 2, 6
"""The pause is asked for once step 2's metrics arrive; rank 0 sees it before step 3 or (a race) later."""
LOSS_TOLERANCE = 1e-5
"""Absolute, on losses around 1-6: the ranks sum the same terms as one process, in another order."""
WEIGHT_TOLERANCE = 1e-5


def distributed_spec(
    root: Path, name: str, base: Path, train: Path, valid: Path, devices: int
) -> TrainingSpec:
    spec = make_spec(root, name, base, train, valid)
    hyperparameters = spec.hyperparameters.model_copy(
        update={"n_epochs": EPOCHS, "batch_size": BATCH_SIZE, "lora_dropout": 0.0}
    )
    update = {"devices": devices, "hyperparameters": hyperparameters, "checkpoint_every_steps": 2}
    return spec.model_copy(update=update)


def start(spec: TrainingSpec) -> TrainingProcess:
    return TrainingProcess(spec, Path(spec.stop_file).parent)


def finish(child: TrainingProcess, stop_after: int | None = None, stop_with: str = "") -> Run:
    """Every message until the child ends; with `stop_after`, the stop file once that step's metrics come."""
    messages = []
    deadline = time.monotonic() + 300
    while not child.finished:
        assert time.monotonic() < deadline, child.log_tail()
        for message in child.messages(timeout=0.5):
            messages.append(message)
            if isinstance(message, MetricsMessage) and message.step == stop_after:
                child.request_stop(pause=stop_with == "pause")
    assert child.process.returncode == 0, child.log_tail()
    return Run(child.spec, messages, child.process.returncode)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("distributed")
    base = build_tiny_llama(root / "base")
    train = write_jsonl(root / "train.jsonl", N_TRAIN)
    valid = write_jsonl(root / "valid.jsonl", N_VALID, offset=100)
    specs = {
        name: distributed_spec(root, name, base, train, valid, devices)
        for name, devices in (("one", 1), ("two", 2), ("paused", 2))
    }
    children = {name: start(spec) for name, spec in specs.items()}
    runs = {"paused": finish(children["paused"], stop_after=PAUSE_AFTER, stop_with="pause")}
    runs |= {name: finish(children[name]) for name in ("one", "two")}
    resumed = {
        "two_on_one": distributed_spec(root, "two_on_one", base, train, valid, 1).model_copy(
            update={"resume_from": str(checkpoint_dir(specs["two"], RESUME_AT))}
        ),
        "paused_resumed": distributed_spec(root, "paused_resumed", base, train, valid, 2).model_copy(
            update={"resume_from": str(checkpoint_dir(specs["paused"], paused_at(runs["paused"])))}
        ),
    }
    children = {name: start(spec) for name, spec in resumed.items()}
    runs |= {name: finish(child) for name, child in children.items()}
    return runs


def paused_at(run: Run) -> int:
    [stopped] = run.of_type(StoppedMessage)
    return stopped.step


def losses(run: Run) -> dict[int, float]:
    return {m.step: m.metrics["train_loss"] for m in run.of_type(MetricsMessage)}


def adapter(run: Run) -> dict[str, torch.Tensor]:
    [completed] = run.of_type(CompletedMessage)
    return load_file(Path(completed.adapter_path) / "adapter_model.safetensors")


def test_two_ranks_train_what_one_rank_trains(runs: dict[str, Run]) -> None:
    one, two = runs["one"], runs["two"]
    # The same protocol: rank 0 alone reports, each event once.
    kinds = [type(m).__name__ for m in two.messages if not isinstance(m, LogMessage)]
    assert kinds == [type(m).__name__ for m in one.messages if not isinstance(m, LogMessage)]
    assert {m.level for m in two.of_type(LogMessage)} == {"info"}
    assert list(losses(two)) == list(range(1, TOTAL_STEPS + 1))
    assert losses(two) == pytest.approx(losses(one), abs=LOSS_TOLERANCE)
    # Every step's metrics, the validation batch's too (each rank scores its share, the sums reduced).
    for ours, theirs in zip(two.of_type(MetricsMessage), one.of_type(MetricsMessage), strict=True):
        assert "valid_loss" in ours.metrics  # every max(1, 8 // 10) steps
        assert ours.metrics == pytest.approx(theirs.metrics, rel=LOSS_TOLERANCE, abs=LOSS_TOLERANCE)
    # Training moved the loss at all, so equal losses are not two untouched models.
    assert losses(one)[TOTAL_STEPS] < losses(one)[1]
    for ours, theirs in zip(two.of_type(EvaluationMessage), one.of_type(EvaluationMessage), strict=True):
        assert ours.step == theirs.step
        # Relative: perplexity is exp(loss), so its absolute error grows with it.
        assert ours.metrics == pytest.approx(theirs.metrics, rel=LOSS_TOLERANCE)
    [done_one], [done_two] = one.of_type(CompletedMessage), two.of_type(CompletedMessage)
    # Each example once per epoch, counted over both ranks.
    assert done_two.trained_tokens == done_one.trained_tokens
    assert [c.step for c in two.of_type(CheckpointMessage)] == [2, 4, 6, 8]

    weights_one, weights_two = adapter(one), adapter(two)
    assert weights_one.keys() == weights_two.keys()
    assert all(torch.allclose(weights_two[k], w, atol=WEIGHT_TOLERANCE) for k, w in weights_one.items())
    assert any(not torch.equal(weights_two[k], w) for k, w in weights_one.items())  # not a copied file


def test_a_pause_stops_both_ranks_at_one_step_with_a_checkpoint(runs: dict[str, Run]) -> None:
    paused = runs["paused"]
    step = paused_at(paused)
    assert PAUSE_AFTER <= step < TOTAL_STEPS
    assert [m.step for m in paused.of_type(MetricsMessage)] == list(range(1, step + 1))
    # Every 2 steps, and the pause's own unless the interval just wrote it.
    assert [c.step for c in paused.of_type(CheckpointMessage)] == sorted({2, step})
    assert not paused.of_type(CompletedMessage)


@pytest.mark.parametrize("name", ["paused_resumed", "two_on_one"])
def test_a_checkpoint_resumes_on_either_world_size(runs: dict[str, Run], name: str) -> None:
    resumed, one = runs[name], runs["one"]
    first_step = (paused_at(runs["paused"]) if name == "paused_resumed" else RESUME_AT) + 1
    assert list(losses(resumed)) == list(range(first_step, TOTAL_STEPS + 1))
    expected = {step: loss for step, loss in losses(one).items() if step >= first_step}
    assert losses(resumed) == pytest.approx(expected, abs=LOSS_TOLERANCE)
    weights = adapter(resumed)
    assert all(torch.allclose(weights[k], w, atol=WEIGHT_TOLERANCE) for k, w in adapter(one).items())
