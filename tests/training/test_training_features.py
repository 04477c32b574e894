"""Training features beyond the plain loop, each against what it must equal: packed rows against the same
examples run apart, gradient accumulation against one large batch, gradient checkpointing against none;
plus length grouping, weight decay groups, schedules and early stopping."""

from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from models.spec import (
    CheckpointMessage,
    CompletedMessage,
    EvaluationMessage,
    LogMessage,
    MetricsMessage,
    TrainingSpec,
)
from tests.training.test_sft_resume import Recorder, run_here
from tests.training.test_sft_run import make_spec, write_jsonl
from worker.training.batching import epoch_batches, pack
from worker.training.data import IGNORE_INDEX, collate, load_dataset, pack_examples
from worker.training.device import DeviceConfig, select_device
from worker.training.loading import load_tokenizer
from worker.training.recipe import Recipe


def spec_with(root: Path, name: str, base: Path, n_train: int = 8, **hyperparameters: Any) -> TrainingSpec:
    train, valid = root / "train.jsonl", root / "valid.jsonl"
    if not train.exists():
        write_jsonl(train, n_train)
        write_jsonl(valid, 3, offset=100)
    spec = make_spec(root, name, base, train, valid)
    # No dropout, so runs that should compute the same thing do.
    hp = spec.hyperparameters.model_copy(update={"lora_dropout": 0.0, "n_epochs": 1, **hyperparameters})
    return spec.model_copy(update={"hyperparameters": hp})


def adapter_weights(events: Recorder) -> dict[str, torch.Tensor]:
    [completed] = events.of_type(CompletedMessage)
    return load_file(Path(completed.adapter_path) / "adapter_model.safetensors")


def test_pack_fills_rows_best_fit_without_splitting_or_losing_examples() -> None:
    lengths = [7, 3, 5, 2, 8, 1, 4, 6]
    rows = pack(lengths, capacity=8)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 8 for row in rows)
    assert len(rows) == 5  # 36 tokens need at least 5 rows of 8; best fit reaches that bound


def test_packed_rows_give_each_example_the_logits_it_has_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = load_dataset(write_jsonl(tmp_path / "d.jsonl", 6), "chat", tokenizer, 128).examples
    rows = pack_examples(examples, capacity=3 * max(e.length for e in examples))
    assert len(rows) < len(examples)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = collate(rows, tokenizer.pad_token_id)
    assert "attention_mask" not in batch  # restarting positions are what keeps examples apart
    with torch.no_grad():
        # As the recipe calls it: without a cache (with one, transformers does not look for packing).
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        for r, row in enumerate(rows):
            assert row.position_ids is not None
            starts = [n for n, position in enumerate(row.position_ids) if position == 0]
            for start, end in pairwise([*starts, row.length]):
                alone = model(input_ids=batch["input_ids"][r, start:end][None]).logits[0]
                torch.testing.assert_close(packed[r, start:end], alone, rtol=1e-4, atol=1e-5)
    # Each example's first label is masked: no token is trained on predicting the next example.
    for row in rows:
        assert row.position_ids is not None
        starts = [n for n, position in enumerate(row.position_ids) if position == 0]
        assert all(row.labels[n] == IGNORE_INDEX for n in starts)
    assert sum(row.units for row in rows) == sum(example.units for example in examples)


def test_length_grouping_keeps_every_example_and_cuts_padding() -> None:
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    plain = epoch_batches(lengths, 8, seed=1, group_by_length=False)
    grouped = epoch_batches(lengths, 8, seed=1, group_by_length=True)
    assert grouped == epoch_batches(lengths, 8, seed=1, group_by_length=True)  # seeded
    assert sorted(i for batch in grouped for i in batch) == list(range(400))

    def padding(batches: list[list[int]]) -> int:
        return sum(
            max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch) for batch in batches
        )

    assert padding(grouped) < padding(plain) / 5


def test_gradient_accumulation_trains_as_one_large_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    large = run_here(spec_with(tmp_path, "large", tiny_model_dir, batch_size=4))
    accumulated = run_here(
        spec_with(tmp_path, "accumulated", tiny_model_dir, batch_size=2, gradient_accumulation_steps=2)
    )
    assert [m.step for m in accumulated.of_type(MetricsMessage)] == [1, 2]
    for name, weight in adapter_weights(large).items():
        torch.testing.assert_close(adapter_weights(accumulated)[name], weight, rtol=1e-4, atol=1e-6, msg=name)
    first = [m.metrics["train_loss"] for m in large.of_type(MetricsMessage)]
    assert [m.metrics["train_loss"] for m in accumulated.of_type(MetricsMessage)] == pytest.approx(
        first, rel=1e-5
    )


def test_gradient_checkpointing_changes_memory_not_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = run_here(spec_with(tmp_path, "plain", tiny_model_dir))
    checkpointed = run_here(spec_with(tmp_path, "checkpointed", tiny_model_dir, gradient_checkpointing=True))
    for name, weight in adapter_weights(plain).items():
        torch.testing.assert_close(adapter_weights(checkpointed)[name], weight, rtol=1e-5, atol=1e-6)


def test_weight_decay_spares_biases_and_norms_and_schedules_follow_their_shape(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = spec_with(
        tmp_path, "cosine", tiny_model_dir, n_train=20, batch_size=2, training_type="full",
        weight_decay=0.1, lr_scheduler="cosine", warmup_ratio=0.0, learning_rate=1e-3,
    )  # fmt: skip
    recipe = Recipe(spec, Recorder(spec))
    recipe.setup()
    decayed, spared = recipe.optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and spared["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in spared["params"])
    rates = []
    for _ in range(recipe.total_steps):
        rates.append(recipe.scheduler.get_last_lr()[0])
        recipe.optimizer.step()
        recipe.scheduler.step()
    assert rates[0] == pytest.approx(1e-3) and rates[5] == pytest.approx(5e-4, rel=1e-6)  # half way: half


def test_early_stopping_ends_training_after_patience_evaluations(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A learning rate far too large makes the validation loss worse after its first improvement or two.
    spec = spec_with(
        tmp_path, "diverging", tiny_model_dir, n_train=16, batch_size=2, n_epochs=3, eval_steps=1,
        early_stopping_patience=2, learning_rate=3.0, warmup_ratio=0.0,
    )  # fmt: skip
    events = run_here(spec)
    evaluations = [e for e in events.of_type(EvaluationMessage) if not e.baseline]
    losses = [e.metrics["full_valid_loss"] for e in evaluations]
    best = min(range(len(losses)), key=lambda i: (losses[i], i))
    assert len(evaluations) == best + 3 < 24  # the best, then two without a new best, then stop
    assert any("early stopping" in m.message for m in events.of_type(LogMessage))
    # What it trained is published: the results file has the header, the baseline and each step trained.
    rows = (Path(spec.output_dir) / "step_metrics.csv").read_text().splitlines()
    assert len(rows) == len(evaluations) + 2


def test_mixed_precision_runs_matmuls_in_the_compute_dtype_only_when_set() -> None:
    cpu = select_device()
    assert (cpu.dtype, cpu.compute_dtype, cpu.needs_grad_scaling) == (torch.float32, None, False)
    x = torch.ones(2, 2)
    with cpu.autocast():
        assert (x @ x).dtype == torch.float32
    # What a CUDA device gives a method that trains base weights, tried on the CPU's autocast.
    mixed = DeviceConfig(torch.device("cpu"), torch.float32, torch.bfloat16)
    with mixed.autocast():
        assert (x @ x).dtype == torch.bfloat16
    assert DeviceConfig(torch.device("cpu"), torch.float32, torch.float16).needs_grad_scaling


def test_resuming_after_an_epoch_with_a_short_last_step_repeats_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # 10 examples in batches of 2, two per step: steps of 2, 2 and 1 batches, checkpointed at step 3.
    fields = {"n_train": 10, "batch_size": 2, "gradient_accumulation_steps": 2, "n_epochs": 2}
    whole = run_here(spec_with(tmp_path, "whole", tiny_model_dir, **fields))
    checkpoint = Path(whole.of_type(CheckpointMessage)[0].path)
    assert checkpoint.name == "step-3"
    resumed_spec = spec_with(tmp_path, "resumed", tiny_model_dir, **fields)
    resumed = run_here(resumed_spec.model_copy(update={"resume_from": str(checkpoint)}))
    assert [m.step for m in resumed.of_type(MetricsMessage)] == [4, 5, 6]
    for name, weight in adapter_weights(whole).items():
        torch.testing.assert_close(adapter_weights(resumed)[name], weight, rtol=1e-5, atol=1e-6, msg=name)
