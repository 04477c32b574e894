"""The training child as the runner starts it: `python -m worker.training` with an events pipe.

Three children run at once (two with the same seed, one stopped after its second step) so the module
pays for the heavy torch/transformers imports only once in wall time.
"""

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TypeVar

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
    LogMessage,
    MetricsMessage,
    StartedMessage,
    StoppedMessage,
    TrainingSpec,
)
from tests.tiny_model import build_tiny_llama
from worker.training.data import collate, load_dataset
from worker.training.sft import load_tokenizer, token_stats

REPO = Path(__file__).resolve().parents[2]
N_TRAIN, N_VALID, BATCH_SIZE, EPOCHS = 21, 5, 2, 2
STEPS_PER_EPOCH = 11  # ceil(21 / 2), the last batch holds one example
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH  # 22 → a validation mini-batch every 22 // 10 = 2 steps
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


def start_child(spec: TrainingSpec) -> tuple[subprocess.Popen[bytes], int]:
    read_fd, write_fd = os.pipe()
    workdir = Path(spec.stop_file).parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # three children share the machine; also keeps the two seeded runs alike
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
    spec: TrainingSpec, process: subprocess.Popen[bytes], read_fd: int, stop_after: int | None = None
) -> Run:
    """Read events to EOF; with `stop_after`, create the stop file once that step's metrics arrive."""
    messages: list[ChildMessage] = []
    with os.fdopen(read_fd, encoding="utf-8") as events:
        for line in events:
            messages.append(MESSAGES.validate_json(line))
            if isinstance(messages[-1], MetricsMessage) and messages[-1].step == stop_after:
                Path(spec.stop_file).touch()
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
    children = {name: start_child(spec) for name, spec in specs.items()}
    # The stopped child is read first, live, so its stop file lands mid-training.
    order = ["stopped", "first", "again"]
    return {
        name: finish_child(specs[name], *children[name], stop_after=2 if name == "stopped" else None)
        for name in order
    }


def test_events_follow_the_training_protocol(runs: dict[str, Run]) -> None:
    run = runs["first"]
    assert [type(m).__name__ for m in run.messages if not isinstance(m, LogMessage)] == [
        "StartedMessage",
        *["MetricsMessage"] * STEPS_PER_EPOCH,
        "CheckpointMessage",
        *["MetricsMessage"] * STEPS_PER_EPOCH,
        "CheckpointMessage",
        "CompletedMessage",
    ]
    assert {m.level for m in run.of_type(LogMessage)} == {"info"}
    assert run.of_type(StartedMessage) == [StartedMessage(total_steps=TOTAL_STEPS, n_train_examples=N_TRAIN)]

    metrics = run.of_type(MetricsMessage)
    assert [m.step for m in metrics] == list(range(1, TOTAL_STEPS + 1))
    assert {m.total_steps for m in metrics} == {TOTAL_STEPS}
    assert all(a.elapsed_seconds <= b.elapsed_seconds for a, b in pairwise(metrics))
    for m in metrics:
        expected = {"train_loss", "train_mean_token_accuracy"}
        if m.step % 2 == 0:
            expected |= {"valid_loss", "valid_mean_token_accuracy"}
        if m.step % STEPS_PER_EPOCH == 0:
            expected |= {"full_valid_loss", "full_valid_mean_token_accuracy"}
        assert set(m.metrics) == expected, m.step
        assert 0.0 <= m.metrics["train_mean_token_accuracy"] <= 1.0
    by_step = {m.step: m.metrics for m in metrics}
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


def test_results_csv_has_one_row_per_step(runs: dict[str, Run]) -> None:
    run = runs["first"]
    with open(Path(run.spec.output_dir) / "step_metrics.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert len(rows) == TOTAL_STEPS + 1
    for row, m in zip(rows[1:], run.of_type(MetricsMessage), strict=True):
        names = ["train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy"]
        assert row == [str(m.step), *(f"{m.metrics[n]:.5f}" if n in m.metrics else "" for n in names)]
    assert rows[1][3:] == ["", ""] and rows[2][3] != ""


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
