"""`full` and `freeze` on two CPU ranks, sharded with FSDP2, against the same jobs on one rank, started as
the runner starts them (`worker.child.TrainingProcess`, through `worker.training.launch` for 2 ranks).

Every weight, gradient and optimizer state is split over the ranks, yet each step trains the same global
batch in the same order, so the losses agree to float32 summation order. Checkpoints hold the trainer state
as torch.distributed.checkpoint shards (its safetensors writer), so a checkpoint of the 2-rank job resumes
on 1 rank and one of the 1-rank job on 2, each ending as the uninterrupted run. A pause stops both ranks at
one step after a collective checkpoint. The published model has the 1-rank job's format and weights.

The base ties its LM head to its input embeddings, as SmolLM2 does: the published model holds that matrix
once, as a 1-rank job's does. Two waves: 1 and 2 ranks of each method plus a paused and a cancelled 2-rank
full job at once; then the two resumptions.
"""

from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from models.spec import (
    CheckpointMessage,
    CompletedMessage,
    EvaluationMessage,
    LogMessage,
    MetricsMessage,
    TrainingSpec,
)
from tests.tiny_model import build_tiny_llama
from tests.training.test_distributed import distributed_spec, finish, losses, paused_at, start
from tests.training.test_sft_run import Run, checkpoint_dir, write_jsonl

pytestmark = pytest.mark.distributed

N_TRAIN, N_VALID = 15, 4
TOTAL_STEPS = 8  # test_distributed's shape: 2 epochs of 4 steps, the last batch of each 3 examples
RESUME_AT = 6
LOSS_TOLERANCE = 1e-5
"""Absolute, on losses around 1-6: the ranks sum the same terms as one process, in another order."""
WEIGHT_TOLERANCE = 1e-5
ARTIFACT = {"full": "model.safetensors", "freeze": "trained_tensors.safetensors"}


def sharded_spec(
    root: Path, name: str, files: tuple[Path, Path, Path], method: str, devices: int
) -> TrainingSpec:
    spec = distributed_spec(root, name, *files, devices)
    hyperparameters = spec.hyperparameters.model_copy(
        update={"training_type": method, "trainable_layers": 1, "learning_rate": 1e-3}
    )
    spec = spec.model_copy(update={"hyperparameters": hyperparameters})
    (Path(spec.stop_file).parent / "spec.json").write_text(spec.model_dump_json())
    return spec


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("sharded")
    files = (
        build_tiny_llama(root / "base", tie_word_embeddings=True),  # as SmolLM2: the head is the embeddings
        write_jsonl(root / "train.jsonl", N_TRAIN),
        # 99 and 101 on rank 0, 100 and 102 on rank 1: answers of other lengths at once, so the ranks'
        # exact-match generations run other numbers of steps (in lockstep only by synced_gpus).
        write_jsonl(root / "valid.jsonl", N_VALID, offset=99),
    )
    specs = {
        f"{method}_{devices}": sharded_spec(root, f"{method}_{devices}", files, method, devices)
        for method in ARTIFACT
        for devices in (1, 2)
    }
    specs["paused"] = sharded_spec(root, "paused", files, "full", 2)
    # Long enough to be still training when its events are read, after the paused job's.
    cancelled = sharded_spec(root, "cancelled", files, "full", 2)
    long = cancelled.hyperparameters.model_copy(update={"n_epochs": 100})
    specs["cancelled"] = cancelled.model_copy(update={"hyperparameters": long})
    children = {name: start(spec) for name, spec in specs.items()}
    runs = {"paused": finish(children.pop("paused"), stop_after=2, stop_with="pause")}
    runs["cancelled"] = finish(children.pop("cancelled"), stop_after=1)
    runs |= {name: finish(child) for name, child in children.items()}
    resumed = {
        "two_on_one": sharded_spec(root, "two_on_one", files, "full", 1).model_copy(
            update={"resume_from": str(checkpoint_dir(specs["full_2"], RESUME_AT))}
        ),
        "one_on_two": sharded_spec(root, "one_on_two", files, "full", 2).model_copy(
            update={"resume_from": str(checkpoint_dir(specs["full_1"], RESUME_AT))}
        ),
    }
    children = {name: start(spec) for name, spec in resumed.items()}
    runs |= {name: finish(child) for name, child in children.items()}
    return runs


def published(run: Run) -> tuple[Path, dict[str, torch.Tensor]]:
    [completed] = run.of_type(CompletedMessage)
    directory = Path(completed.adapter_path)
    method = run.spec.hyperparameters.training_type
    return directory, load_file(directory / ARTIFACT[method])


@pytest.mark.parametrize("method", list(ARTIFACT))
def test_two_sharded_ranks_train_what_one_rank_trains(runs: dict[str, Run], method: str) -> None:
    one, two = runs[f"{method}_1"], runs[f"{method}_2"]
    kinds = [type(m).__name__ for m in two.messages if not isinstance(m, LogMessage)]
    assert kinds == [type(m).__name__ for m in one.messages if not isinstance(m, LogMessage)]
    assert {m.level for m in two.of_type(LogMessage)} == {"info"}
    assert list(losses(two)) == list(range(1, TOTAL_STEPS + 1))
    assert losses(two) == pytest.approx(losses(one), abs=LOSS_TOLERANCE)
    # Every step's metrics, the validation batch's too (each rank scores its share, the sums reduced).
    for ours, theirs in zip(two.of_type(MetricsMessage), one.of_type(MetricsMessage), strict=True):
        assert "valid_loss" in ours.metrics  # every max(1, 8 // 10) steps
        assert ours.metrics == pytest.approx(theirs.metrics, rel=LOSS_TOLERANCE, abs=LOSS_TOLERANCE)
    assert losses(one)[TOTAL_STEPS] < losses(one)[1]  # it trained: equal losses are not two idle models
    for ours, theirs in zip(two.of_type(EvaluationMessage), one.of_type(EvaluationMessage), strict=True):
        assert ours.step == theirs.step
        assert ours.metrics == pytest.approx(theirs.metrics, rel=LOSS_TOLERANCE)
    [done_one], [done_two] = one.of_type(CompletedMessage), two.of_type(CompletedMessage)
    assert done_two.trained_tokens == done_one.trained_tokens
    assert [c.step for c in two.of_type(CheckpointMessage)] == [2, 4, 6, 8]

    # The published model: the 1-rank job's files (whole tensors, not shards) and weights.
    (dir_one, weights_one), (dir_two, weights_two) = published(one), published(two)
    assert sorted(p.name for p in dir_two.iterdir()) == sorted(p.name for p in dir_one.iterdir())
    assert weights_one.keys() == weights_two.keys()
    for name, weight in weights_one.items():
        assert weights_two[name].shape == weight.shape, name
        assert torch.allclose(weights_two[name], weight, atol=WEIGHT_TOLERANCE), name
    assert any(not torch.equal(weights_two[k], w) for k, w in weights_one.items())  # not a copied file


def test_sharded_checkpoints_hold_every_ranks_shards(runs: dict[str, Run]) -> None:
    """torch.distributed.checkpoint's safetensors writer: one file per rank, no pickle, COMPLETE last."""
    for name, ranks in (("full_1", 1), ("full_2", 2)):
        step = checkpoint_dir(runs[name].spec, 2)
        assert (step / "COMPLETE").is_file()
        shards = sorted(p.name for p in (step / "trainer" / "sharded").iterdir())
        assert len(shards) == ranks and all(shard.endswith(".safetensors") for shard in shards), shards
        assert not (step / "trainer" / "trainable.safetensors").exists()
        assert (step / "model.safetensors").is_file()  # every checkpoint is a servable model
        assert not [p for p in step.rglob("*") if p.suffix in {".bin", ".pt", ".pkl", ".metadata"}]


def test_a_pause_stops_both_sharded_ranks_with_a_checkpoint(runs: dict[str, Run]) -> None:
    paused = runs["paused"]
    step = paused_at(paused)
    assert 2 <= step < TOTAL_STEPS
    assert [m.step for m in paused.of_type(MetricsMessage)] == list(range(1, step + 1))
    assert [c.step for c in paused.of_type(CheckpointMessage)] == sorted({2, step})
    assert (checkpoint_dir(paused.spec, step) / "COMPLETE").is_file()
    assert not paused.of_type(CompletedMessage)


def test_a_cancel_ends_both_sharded_ranks(runs: dict[str, Run]) -> None:
    """The runner's cancel is the stop file (then a kill after the grace, not needed here): both ranks
    leave at one step, without a checkpoint, and no process of the job is left."""
    cancelled = runs["cancelled"]
    step = paused_at(cancelled)
    assert step < 100 * 4  # stopped, not finished
    assert [m.step for m in cancelled.of_type(MetricsMessage)] == list(range(1, step + 1))
    assert all(c.step % 2 == 0 for c in cancelled.of_type(CheckpointMessage))  # the interval's only
    assert not cancelled.of_type(CompletedMessage)
    workdir = str(Path(cancelled.spec.stop_file).parent)
    left = [
        p for p in psutil.process_iter(["cmdline"]) if any(workdir in arg for arg in p.info["cmdline"] or [])
    ]
    assert left == []


@pytest.mark.parametrize(("name", "reference"), [("two_on_one", "full_1"), ("one_on_two", "full_1")])
def test_a_sharded_checkpoint_resumes_on_another_world_size(
    runs: dict[str, Run], name: str, reference: str
) -> None:
    resumed, one = runs[name], runs[reference]
    assert list(losses(resumed)) == list(range(RESUME_AT + 1, TOTAL_STEPS + 1))
    expected = {step: loss for step, loss in losses(one).items() if step > RESUME_AT}
    assert losses(resumed) == pytest.approx(expected, abs=LOSS_TOLERANCE)
    _, weights = published(resumed)
    assert all(torch.allclose(weights[k], w, atol=WEIGHT_TOLERANCE) for k, w in published(one)[1].items())
