"""The learning-rate range test that resolves `learning_rate_multiplier: "auto"`: the rule on made-up
curves, what "auto" asks of the trainer, and real tests on a tiny random Llama, in this process (the
weights and RNG it hands to training) and as the runner starts it, for lora and full, on one and two
ranks (the same pick).

The job: 40 examples in batches of 2 for 20 epochs, 400 steps, so a budget of 20 test steps; the children
pause after their second step (the test has run, and a checkpoint shows what training did with its pick).
"""

import math
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.hyperparameters import SupervisedHyperparameters, echoed, resolve
from models.spec import METHODS, ChildMessage, LearningRateMessage, MetricsMessage, TrainingSpec
from tests.tiny_model import build_tiny_llama
from tests.training.test_distributed import finish, start
from tests.training.test_sft_run import Run, checkpoint_dir, make_spec, write_jsonl
from worker.training import lr_range
from worker.training.checkpoint import job_fingerprint
from worker.training.events import EventWriter
from worker.training.recipe import Recipe

N_TRAIN, BATCH_SIZE, EPOCHS = 40, 2, 20
TOTAL_STEPS = EPOCHS * N_TRAIN // BATCH_SIZE
PAUSE_AFTER = 2
WEIGHT_TOLERANCE = 1e-5
LOSS_TOLERANCE = 1e-5
"""As tests/training/test_distributed.py: the ranks sum the same terms in another order."""


class Collected(EventWriter):
    """The messages a recipe emits, kept in a list (this process plays the runner)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.messages: list[ChildMessage] = []

    def emit(self, message: ChildMessage) -> None:
        self.messages.append(message)


def lr_spec(
    root: Path,
    name: str,
    base: Path,
    train: Path,
    valid: Path,
    *,
    search: bool = True,
    devices: int = 1,
    method: str = "lora",
) -> TrainingSpec:
    """The job with "auto" (search) or with the method's default rate given."""
    spec = make_spec(root, name, base, train, valid)
    hyperparameters = spec.hyperparameters.model_copy(
        update={
            "training_type": method,
            "n_epochs": EPOCHS,
            "batch_size": BATCH_SIZE,
            "learning_rate": METHODS[method].base_learning_rate,
            "learning_rate_search": search,
            "lora_dropout": 0.0,  # ranks draw dropout from their own streams: 2 ranks would differ from 1
        }
    )
    # A checkpoint at step 2 whenever the pause lands.
    update = {"hyperparameters": hyperparameters, "devices": devices, "checkpoint_every_steps": PAUSE_AFTER}
    return spec.model_copy(update=update)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    root = tmp_path_factory.mktemp("lr_range")
    base = build_tiny_llama(root / "base")
    return root, base, write_jsonl(root / "train.jsonl", N_TRAIN), write_jsonl(root / "valid.jsonl", 4, 100)


@pytest.fixture(scope="module")
def runs(data: tuple[Path, Path, Path, Path]) -> dict[str, Run]:
    root, base, train, valid = data
    # lora replicates the model on each rank (DDP); full shards it (FSDP2), and the test's weights too.
    specs = {
        f"{method}-{devices}": lr_spec(
            root, f"{method}-{devices}", base, train, valid, devices=devices, method=method
        )
        for method in ("lora", "full")
        for devices in (1, 2)
    }
    children = {name: start(spec) for name, spec in specs.items()}
    return {
        name: finish(child, stop_after=PAUSE_AFTER, stop_with="pause") for name, child in children.items()
    }


def test_the_budget_is_five_percent_of_the_steps_at_most_48() -> None:
    assert lr_range.budget(800, 2) == 20  # this module's job
    assert lr_range.budget(639, 2) == 15 < lr_range.MIN_STEPS  # too short: the default stays
    assert lr_range.budget(330 * 10, 8) == 20  # 413 steps (the last batch of each epoch short), 5 % of 3,300
    assert lr_range.budget(1_000_000, 4) == lr_range.MAX_STEPS
    rates = lr_range.rates(2e-4, 20)
    assert rates[0] == pytest.approx(2e-6) and rates[-1] == pytest.approx(2e-2)
    assert all(b / a == pytest.approx(10 ** (4 / 19)) for a, b in pairwise(rates))


def test_the_pick_is_a_tenth_of_the_rate_at_the_lowest_smoothed_loss() -> None:
    rates = lr_range.rates(1.0, 40)
    curve = lr_range.Curve()
    # Falls fastest around step 10 (a model learning its format), lowest around step 25, blows up from 32.
    for step, rate in enumerate(rates):
        loss = 3 - 2 / (1 + math.exp(-(step - 10) / 2)) + 0.5 * ((step - 25) / 5) ** 2
        loss += 0 if step < 32 else 4 ** (step - 31)
        if not curve.add(rate, loss):
            break
    assert curve.diverged_at is not None and curve.diverged_at > rates[31]
    rate, reason = curve.pick()
    assert rate is not None and "lowest smoothed loss" in reason
    # The smoothing's lag moves the lowest point a step or two later, never earlier; the steepest (step 10)
    # would have been far below.
    assert rates[25] / 10 <= rate <= rates[28] / 10


@pytest.mark.parametrize(
    ("losses", "why"),
    [
        ([1.0] * 20, "did not fall"),
        ([2.0, 1.9, 1.8, 1.7, 1.6, 100.0], "diverged after"),
        ([1.0, math.nan], "diverged after"),
    ],
)
def test_no_pick_without_a_falling_curve(losses: list[float], why: str) -> None:
    curve = lr_range.Curve()
    for rate, loss in zip(lr_range.rates(1.0, len(losses)), losses, strict=True):
        if not curve.add(rate, loss):
            break
    rate, reason = curve.pick()
    assert rate is None and why in reason


@pytest.mark.parametrize(
    ("given", "training_type", "search"),
    [
        ({}, "lora", True),
        ({}, "full", True),
        ({"learning_rate_multiplier": 2.0}, "lora", False),
        ({"learning_rate": 1e-3}, "lora", False),
        ({}, "feature_extraction", False),  # a solved head: no steps to test
    ],
)
def test_only_auto_asks_for_a_search(given: dict[str, float], training_type: str, search: bool) -> None:
    requested = SupervisedHyperparameters.model_validate({**given, "training_type": training_type})
    objective = "classification" if training_type == "feature_extraction" else "sft"
    resolved = resolve(requested, 100, objective)
    assert resolved.learning_rate_search is search
    shown = echoed("supervised", requested.model_dump(), resolved)
    # Until the trainer reports, the echo says "auto" (and sent back, asks for a search again).
    assert shown["learning_rate_multiplier"] == ("auto" if search else resolved.learning_rate_multiplier)


def test_training_starts_from_the_weights_and_rng_it_would_have_without_the_test(
    data: tuple[Path, Path, Path, Path],
) -> None:
    root, base, train, valid = data
    recipes = {}
    for search in (True, False):
        events = Collected()
        recipe = Recipe(lr_spec(root, f"in-process-{search}", base, train, valid, search=search), events)
        recipe.setup()
        recipes[search] = recipe, events, torch.get_rng_state()
    (searched, events, rng), (plain, plain_events, plain_rng) = recipes[True], recipes[False]
    assert not any(isinstance(m, LearningRateMessage) for m in plain_events.messages)  # given: no test
    [found] = [m for m in events.messages if isinstance(m, LearningRateMessage)]
    for ours, theirs in zip(searched.trainable, plain.trainable, strict=True):
        assert torch.equal(ours, theirs)
    assert torch.equal(rng, plain_rng)
    assert searched.progress.trained_tokens == 0
    # The optimizer trains with the pick, and the fingerprint is the one a resumed attempt (its spec
    # carrying the pick, the search off) computes.
    assert searched.optimizer.param_groups[0]["initial_lr"] == found.learning_rate
    stored = plain.spec.hyperparameters.model_copy(
        update={
            "learning_rate": found.learning_rate,
            "learning_rate_multiplier": found.learning_rate_multiplier,
        }
    )
    resumed = plain.spec.model_copy(update={"hyperparameters": stored, "job_id": searched.spec.job_id})
    assert searched.fingerprint == job_fingerprint(resumed, N_TRAIN, 4)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_pick_is_reported_with_its_curve_and_a_bounded_cost(runs: dict[str, Run], method: str) -> None:
    run = runs[f"{method}-1"]
    [found] = run.of_type(LearningRateMessage)
    assert found.found, found.reason
    base = METHODS[method].base_learning_rate
    assert found.learning_rate == pytest.approx(base * found.learning_rate_multiplier)
    assert lr_range.LOWEST <= found.learning_rate_multiplier <= lr_range.HIGHEST
    assert found.total_steps == TOTAL_STEPS and found.budget_steps == 20
    # Cost: at most 5 % of the examples the job trains on, and so of its steps.
    assert found.planned_examples == EPOCHS * N_TRAIN
    assert found.examples == found.steps * BATCH_SIZE <= 0.05 * EPOCHS * N_TRAIN
    assert 0 < found.steps <= found.budget_steps <= 0.05 * TOTAL_STEPS
    assert found.cost == found.examples / found.planned_examples <= 0.05
    assert len(found.rates) == len(found.losses) > 0 and found.rates == sorted(found.rates)
    assert min(found.losses) < found.losses[0]
    # Reported before training's first step.
    kinds = [type(m) for m in run.messages]
    assert kinds.index(LearningRateMessage) < kinds.index(MetricsMessage)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_ranks_pick_what_one_rank_picks(runs: dict[str, Run], method: str) -> None:
    ones, twos = runs[f"{method}-1"], runs[f"{method}-2"]
    [one], [two] = ones.of_type(LearningRateMessage), twos.of_type(LearningRateMessage)
    assert two.learning_rate == one.learning_rate and two.steps == one.steps
    assert two.losses == pytest.approx(one.losses, abs=LOSS_TOLERANCE)
    # Both ranks trained from the restored weights with the pick: the second step's loss depends on what
    # each rank's first step did.
    losses = [{m.step: m.metrics["train_loss"] for m in run.of_type(MetricsMessage)} for run in (ones, twos)]
    assert losses[1][PAUSE_AFTER] == pytest.approx(losses[0][PAUSE_AFTER], abs=LOSS_TOLERANCE)
    if method == "full":
        return  # sharded checkpoints: the losses say it
    weights_one = load_file(checkpoint_dir(ones.spec, PAUSE_AFTER) / "adapter_model.safetensors")
    weights_two = load_file(checkpoint_dir(twos.spec, PAUSE_AFTER) / "adapter_model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    assert all(torch.allclose(weights_two[k], w, atol=WEIGHT_TOLERANCE) for k, w in weights_one.items())
