"""The training child as the runner starts it: `python -m worker.training` with an events pipe.

Three children run at once (two with the same seed, the second also checkpointing every few steps, and
one stopped after its second step) so the module pays for the heavy torch/transformers imports only once
in wall time. A fourth resumes from a mid-epoch checkpoint of the second and must end as the first does.
"""

import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from peft import PeftModel
from pydantic import TypeAdapter
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from models.spec import (
    CheckpointMessage,
    ChildMessage,
    CompletedMessage,
    EvaluationMessage,
    LogMessage,
    MetricsMessage,
    StartedMessage,
    StoppedMessage,
    TrainingSpec,
)
from tests.tiny_model import build_tiny_llama
from worker.training.data import collate, load_dataset
from worker.training.device import describe, select_device
from worker.training.loading import load_tokenizer
from worker.training.objectives.causal_lm import token_stats

REPO = Path(__file__).resolve().parents[2]
N_TRAIN, N_VALID, BATCH_SIZE, EPOCHS = 21, 5, 2, 2
FULL_METRICS = [f"full_valid_{name}" for name in ("loss", "mean_token_accuracy", "perplexity", "exact_match")]
STEPS_PER_EPOCH = 11  # ceil(21 / 2), the last batch holds one example
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH  # 22 → a validation mini-batch every 22 // 10 = 2 steps
CHECKPOINT_EVERY = 2  # 2, 4, ..., 10, 11 (epoch end), 12, ..., 22 (an epoch end on the interval: once)
RESUME_AT = 10  # mid-epoch: the first epoch has one batch left
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}
MESSAGES = TypeAdapter(ChildMessage)
T = TypeVar("T")


@dataclass
class Run:
    spec: TrainingSpec
    messages: list[ChildMessage]
    returncode: int

    def of_type(self, cls: type[T]) -> list[T]:
        return [message for message in self.messages if isinstance(message, cls)]


def write_jsonl(path: Path, count: int, offset: int = 0) -> Path:
    rows = []
    for i in range(offset, offset + count):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"What is {i} plus {i}?"},
                    {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
                ]
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_spec(root: Path, name: str, base: Path, train: Path, valid: Path) -> TrainingSpec:
    spec = TrainingSpec.model_validate(
        {
            "job_id": f"ftjob-{name}",
            "base_model_path": str(base),
            "training_file": str(train),
            "validation_file": str(valid),
            "data_format": "chat",
            "objective": "sft",
            "output_dir": str(root / name / "out"),
            "stop_file": str(root / name / "STOP"),
            "seed": 7,
            "hyperparameters": {
                "n_epochs": EPOCHS,
                "batch_size": BATCH_SIZE,
                "learning_rate_multiplier": 1.0,
                "learning_rate": 2e-2,
                "lora_r": 8,
                "lora_alpha": 16,
                "lora_dropout": 0.05,
                "lora_target_modules": "all-linear",
                "max_seq_length": 128,
                "warmup_ratio": 0.1,
            },
        }
    )
    (root / name).mkdir()
    (root / name / "spec.json").write_text(spec.model_dump_json())
    return spec


def respec(spec: TrainingSpec, **fields: Any) -> TrainingSpec:
    """`spec` with `fields` changed, rewritten where the child reads it."""
    spec = spec.model_copy(update=fields)
    (Path(spec.stop_file).parent / "spec.json").write_text(spec.model_dump_json())
    return spec


def checkpoint_dir(spec: TrainingSpec, step: int) -> Path:
    return Path(spec.output_dir) / "checkpoints" / f"step-{step}"


def start_child(spec: TrainingSpec) -> tuple[subprocess.Popen[bytes], int]:
    read_fd, write_fd = os.pipe()
    workdir = Path(spec.stop_file).parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # three children share the machine; also keeps the two seeded runs alike
        "PYTHONPROFILEIMPORTTIME": "1",  # every module the child imports, on stderr
    }
    with open(workdir / "stderr.log", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.training", "--spec", str(workdir / "spec.json")]
            + ["--events-fd", str(write_fd)],
            pass_fds=(write_fd,),
            cwd=REPO,
            env=env,
            stderr=stderr,
        )
    os.close(write_fd)
    return process, read_fd


def finish_child(
    spec: TrainingSpec,
    process: subprocess.Popen[bytes],
    read_fd: int,
    stop_after: int | None = None,
    stop_with: str = "",
) -> Run:
    """Read events to EOF; with `stop_after`, write the stop file (content `stop_with`) once that step's
    metrics arrive."""
    messages: list[ChildMessage] = []
    with os.fdopen(read_fd, encoding="utf-8") as events:
        for line in events:
            messages.append(MESSAGES.validate_json(line))
            if isinstance(messages[-1], MetricsMessage) and messages[-1].step == stop_after:
                # Renamed into place: the child must never read the file before its content is there.
                written = Path(spec.stop_file + ".tmp")
                written.write_text(stop_with)
                written.replace(spec.stop_file)
    returncode = process.wait(timeout=120)
    assert returncode == 0, (Path(spec.stop_file).parent / "stderr.log").read_text()[-3000:]
    return Run(spec, messages, returncode)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("sft")
    base = build_tiny_llama(root / "base")
    train = write_jsonl(root / "train.jsonl", N_TRAIN)
    valid = write_jsonl(root / "valid.jsonl", N_VALID, offset=100)
    specs = {name: make_spec(root, name, base, train, valid) for name in ("first", "again", "stopped")}
    specs["again"] = respec(specs["again"], checkpoint_every_steps=CHECKPOINT_EVERY)
    children = {name: start_child(spec) for name, spec in specs.items()}
    # The stopped child is read first, live, so its stop file lands mid-training.
    runs = {"stopped": finish_child(specs["stopped"], *children["stopped"], stop_after=2)}
    runs["again"] = finish_child(specs["again"], *children["again"])
    resumed = respec(
        make_spec(root, "resumed", base, train, valid),
        checkpoint_every_steps=CHECKPOINT_EVERY,
        resume_from=str(checkpoint_dir(specs["again"], RESUME_AT)),
    )
    resumed_child = start_child(resumed)
    runs["first"] = finish_child(specs["first"], *children["first"])
    runs["resumed"] = finish_child(resumed, *resumed_child)
    return runs


def metrics_by_step(run: Run) -> dict[int, dict[str, float]]:
    return {m.step: m.metrics for m in run.of_type(MetricsMessage)}


def test_events_follow_the_training_protocol(runs: dict[str, Run]) -> None:
    run = runs["first"]
    assert [type(m).__name__ for m in run.messages if not isinstance(m, LogMessage)] == [
        "StartedMessage",
        "EvaluationMessage",  # the baseline
        *["MetricsMessage"] * (STEPS_PER_EPOCH - 1),
        "EvaluationMessage",
        "MetricsMessage",
        "CheckpointMessage",
        *["MetricsMessage"] * (STEPS_PER_EPOCH - 1),
        "EvaluationMessage",
        "MetricsMessage",
        "CheckpointMessage",
        "CompletedMessage",
    ]
    assert {m.level for m in run.of_type(LogMessage)} == {"info"}
    device = describe(select_device())  # reported for the pre-flight estimate
    assert run.of_type(StartedMessage) == [
        StartedMessage(total_steps=TOTAL_STEPS, n_train_examples=N_TRAIN, device=device)
    ]

    metrics = run.of_type(MetricsMessage)
    assert [m.step for m in metrics] == list(range(1, TOTAL_STEPS + 1))
    assert {m.total_steps for m in metrics} == {TOTAL_STEPS}
    assert all(a.elapsed_seconds <= b.elapsed_seconds for a, b in pairwise(metrics))
    for m in metrics:
        expected = {"train_loss", "train_mean_token_accuracy"}
        if m.step % 2 == 0:
            expected |= {"valid_loss", "valid_mean_token_accuracy"}
        if m.step % STEPS_PER_EPOCH == 0:
            expected |= set(FULL_METRICS)
        assert set(m.metrics) == expected, m.step
        assert 0.0 <= m.metrics["train_mean_token_accuracy"] <= 1.0
    by_step = {m.step: m.metrics for m in metrics}
    evaluations = run.of_type(EvaluationMessage)
    assert [(e.step, e.baseline) for e in evaluations] == [
        (0, True),
        (STEPS_PER_EPOCH, False),
        (TOTAL_STEPS, False),
    ]
    for evaluation in evaluations:
        assert set(evaluation.metrics) == set(FULL_METRICS)
        assert evaluation.metrics["full_valid_perplexity"] == pytest.approx(
            math.exp(evaluation.metrics["full_valid_loss"])
        )
        # Every validation example ends in an answer: all N_VALID (fewer than the sample) are generated.
        generations = evaluation.details["generations"]
        assert len(generations) == N_VALID
        assert evaluation.metrics["full_valid_exact_match"] == sum(g["match"] for g in generations) / N_VALID
        if evaluation.step:
            assert evaluation.metrics.items() <= by_step[evaluation.step].items()
    # Training moved the model away from the base: the baseline loss is the worst of the three.
    assert evaluations[0].metrics["full_valid_loss"] > evaluations[-1].metrics["full_valid_loss"]
    # The random model learns: the second epoch ends with a lower full validation loss than the first.
    assert by_step[TOTAL_STEPS]["full_valid_loss"] < by_step[STEPS_PER_EPOCH]["full_valid_loss"]

    out = Path(run.spec.output_dir)
    checkpoints = run.of_type(CheckpointMessage)
    assert [(c.step, c.path) for c in checkpoints] == [
        (step, str(out / "checkpoints" / f"step-{step}")) for step in (STEPS_PER_EPOCH, TOTAL_STEPS)
    ]
    assert all(c.metrics == by_step[c.step] for c in checkpoints)

    [completed] = run.of_type(CompletedMessage)
    assert (completed.step, completed.adapter_path, completed.results_csv) == (
        TOTAL_STEPS,
        str(out / "adapter"),
        str(out / "step_metrics.csv"),
    )
    assert completed.metrics == by_step[TOTAL_STEPS]
    # Every example goes through once per epoch, unpadded tokens only.
    tokenizer = load_tokenizer(run.spec.base_model_path)
    data = load_dataset(run.spec.training_file, "chat", tokenizer, 128)
    assert completed.trained_tokens == EPOCHS * sum(len(e.input_ids) for e in data.examples)


def test_a_lora_child_neither_loads_bitsandbytes_nor_shows_known_library_noise(runs: dict[str, Run]) -> None:
    stderr = (Path(runs["first"].spec.stop_file).parent / "stderr.log").read_text()
    lines = stderr.splitlines()
    imported = [line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")]

    assert {"peft", "transformers"} <= set(imported)
    # peft still tries `import bitsandbytes` (a line of its own, refused); loading it would list its modules.
    assert not [name for name in imported if name.startswith("bitsandbytes.")]
    assert "is_gradient_checkpointing" not in stderr


def test_results_csv_has_one_row_per_step(runs: dict[str, Run]) -> None:
    run = runs["first"]
    with open(Path(run.spec.output_dir) / "step_metrics.csv", newline="") as file:
        rows = list(csv.reader(file))
    # OpenAI's columns, then the rest in name order; the baseline evaluation is step 0.
    names = ["train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    names += sorted(FULL_METRICS)
    assert rows[0] == [
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
    ] + sorted(FULL_METRICS)
    assert len(rows) == TOTAL_STEPS + 2
    baseline = run.of_type(EvaluationMessage)[0].metrics
    assert rows[1] == ["0", *(f"{baseline[n]:.5f}" if n in baseline else "" for n in names)]
    for row, m in zip(rows[2:], run.of_type(MetricsMessage), strict=True):
        assert row == [str(m.step), *(f"{m.metrics[n]:.5f}" if n in m.metrics else "" for n in names)]
    assert rows[2][3:5] == ["", ""] and rows[3][3] != ""


def test_adapter_is_saved_as_safetensors_and_reproduces_the_trained_model(runs: dict[str, Run]) -> None:
    run = runs["first"]
    adapter = Path(run.spec.output_dir) / "adapter"
    files = {path.name for path in adapter.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
    } <= files
    assert not [name for name in files if name.endswith(".bin")]
    weights = load_file(adapter / "adapter_model.safetensors")
    checkpoint = load_file(Path(run.of_type(CheckpointMessage)[-1].path) / "adapter_model.safetensors")
    assert weights.keys() == checkpoint.keys()
    assert all(torch.equal(weight, checkpoint[name]) for name, weight in weights.items())

    tokenizer = load_tokenizer(str(adapter))
    valid = load_dataset(run.spec.validation_file, "chat", tokenizer, 128).examples
    batch = collate(valid, tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(run.spec.base_model_path).eval()
    with torch.no_grad():
        base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        tuned_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, correct, n_tokens = token_stats(model, batch)

    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)
    # Same numbers the child reported for its final model on the full validation set.
    reported = run.of_type(CompletedMessage)[0].metrics
    assert loss_sum.item() / n_tokens == pytest.approx(reported["full_valid_loss"], rel=1e-5)
    assert correct / n_tokens == reported["full_valid_mean_token_accuracy"]


def test_same_seed_gives_the_same_training(runs: dict[str, Run]) -> None:
    first, again = runs["first"], runs["again"]
    [first_completed], [again_completed] = first.of_type(CompletedMessage), again.of_type(CompletedMessage)
    assert again_completed.metrics["train_loss"] == first_completed.metrics["train_loss"]
    assert [m.metrics for m in again.of_type(MetricsMessage)] == [
        m.metrics for m in first.of_type(MetricsMessage)
    ]


def test_stop_file_ends_training_without_publishing(runs: dict[str, Run]) -> None:
    run = runs["stopped"]
    assert run.returncode == 0
    steps_done = [m.step for m in run.of_type(MetricsMessage)]
    assert 2 <= len(steps_done) < TOTAL_STEPS
    assert run.messages[-1] == StoppedMessage(step=steps_done[-1])
    assert not run.of_type(CompletedMessage)
    out = Path(run.spec.output_dir)
    assert not (out / "adapter").exists() and not (out / "step_metrics.csv").exists()


def test_checkpoints_land_on_the_interval_and_epoch_ends_once_each(runs: dict[str, Run]) -> None:
    again = runs["again"]
    expected = sorted({*range(CHECKPOINT_EVERY, TOTAL_STEPS + 1, CHECKPOINT_EVERY), STEPS_PER_EPOCH})
    checkpoints = again.of_type(CheckpointMessage)
    assert [c.step for c in checkpoints] == expected
    assert all(c.path == str(checkpoint_dir(again.spec, c.step)) for c in checkpoints)
    by_step = metrics_by_step(again)
    assert all(c.metrics == by_step[c.step] for c in checkpoints)
    # Only finished checkpoints are left: no partial directory of a write in progress.
    root = Path(again.spec.output_dir) / "checkpoints"
    assert sorted(path.name for path in root.iterdir()) == sorted(f"step-{step}" for step in expected)

    step_4 = checkpoint_dir(again.spec, 4)
    files = {str(path.relative_to(step_4)) for path in step_4.rglob("*") if path.is_file()}
    assert {
        "COMPLETE",
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer/trainable.safetensors",
        "trainer/optimizer.safetensors",
        "trainer/rng.safetensors",
        "trainer/state.json",
    } <= files
    assert not {name for name in files if Path(name).suffix in PICKLE_SUFFIXES}
    state = json.loads((step_4 / "trainer" / "state.json").read_text())
    progress = state["progress"]
    assert (progress["step"], progress["epoch"], progress["batches_done"]) == (4, 0, 4)
    assert [step for step, _ in progress["history"]] == [0, 1, 2, 3, 4]  # 0: the baseline
    assert progress["valid_cursor"] == 4  # validation mini-batches of 2 at steps 2 and 4
    assert (state["job"]["seed"], state["job"]["n_train_examples"]) == (7, N_TRAIN)


def test_resumed_run_continues_from_the_next_step(runs: dict[str, Run]) -> None:
    first, again, resumed = runs["first"], runs["again"], runs["resumed"]
    assert resumed.of_type(StartedMessage) == first.of_type(StartedMessage)
    logs = [m.message for m in resumed.of_type(LogMessage)]
    assert any(m.startswith(f"resumed from step {RESUME_AT} of {TOTAL_STEPS} (") for m in logs), logs
    metrics = resumed.of_type(MetricsMessage)
    assert [m.step for m in metrics] == list(range(RESUME_AT + 1, TOTAL_STEPS + 1))
    assert {m.total_steps for m in metrics} == {TOTAL_STEPS}
    uninterrupted = metrics_by_step(first)
    for m in metrics:
        assert m.metrics == pytest.approx(uninterrupted[m.step], rel=0, abs=1e-6), m.step
    # Elapsed time goes on from the checkpoint's instead of starting over.
    assert metrics[0].elapsed_seconds > again.of_type(MetricsMessage)[RESUME_AT - 1].elapsed_seconds
    assert [c.step for c in resumed.of_type(CheckpointMessage)] == [
        c.step for c in again.of_type(CheckpointMessage) if c.step > RESUME_AT
    ]


def test_resumed_run_publishes_what_the_uninterrupted_run_does(runs: dict[str, Run]) -> None:
    [expected], [completed] = (
        runs["first"].of_type(CompletedMessage),
        runs["resumed"].of_type(CompletedMessage),
    )
    assert (completed.step, completed.trained_tokens) == (expected.step, expected.trained_tokens)
    assert completed.metrics == pytest.approx(expected.metrics, rel=0, abs=1e-6)

    weights = load_file(Path(completed.adapter_path) / "adapter_model.safetensors")
    expected_weights = load_file(Path(expected.adapter_path) / "adapter_model.safetensors")
    assert weights.keys() == expected_weights.keys()
    for name, weight in expected_weights.items():
        torch.testing.assert_close(weights[name], weight, rtol=0, atol=1e-6, msg=name)

    def rows(path: str) -> list[list[str]]:
        with open(path, newline="") as file:
            return list(csv.reader(file))

    # One row per step, those trained before the checkpoint included.
    assert [row[0] for row in rows(completed.results_csv)[1:]] == [str(s) for s in range(TOTAL_STEPS + 1)]
    assert rows(completed.results_csv) == rows(expected.results_csv)
