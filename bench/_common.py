"""Shared by the training benches (train_throughput.py, qlora_memory.py): the base model, the real data and
the real training child (`python -m worker.training`) with its events. Not a test."""

import json
import math
import os
import platform
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import TypeAdapter
from transformers import PreTrainedTokenizerBase

from models.settings import Settings
from models.spec import ChildMessage, CompletedMessage, MetricsMessage, TrainingSpec
from worker.child import die_with_parent
from worker.training.data import Example, load_dataset, pack_examples

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MODEL = "smollm2-135m-instruct"
SEED = 7
LORA_HYPERPARAMETERS: dict[str, Any] = {
    "training_type": "lora",
    "n_epochs": 1,
    "learning_rate_multiplier": 1.0,
    "learning_rate": 2e-4,
    "lr_scheduler": "linear",
    "warmup_ratio": 0.05,
    "lora_r": 8,
    "lora_alpha": 16.0,
    "lora_dropout": 0.05,
    "lora_target_modules": "all-linear",
}
"""What both benches train: the service's LoRA defaults, one epoch of a file sized to the steps wanted."""

_MESSAGES = TypeAdapter(ChildMessage)
T = TypeVar("T")


def base_model(model_dir: Path | None) -> Path:
    """`--model-dir`, else the copy `ftjobs models pull` keeps under FTJOBS_DATA_DIR (pulled if absent)."""
    if model_dir is not None:
        return model_dir
    path = Settings().models_root / MODEL
    if not (path / "config.json").exists():
        print(f"{path} is missing: ftjobs models pull {MODEL} ...", flush=True)
        subprocess.run([sys.executable, "-m", "cli", "models", "pull", MODEL], check=True)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def training_file(
    pool: list[dict[str, Any]],
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    steps: int,
    batch_size: int,
    max_seq_length: int,
    *,
    packing: bool,
) -> tuple[Path, list[Example]]:
    """The longest head of the chat `pool` that makes exactly `steps` batches of `batch_size` rows (packed
    rows or single examples), so that one epoch is `steps` optimizer steps; the file and its rows."""

    def rows(examples: list[Example]) -> list[Example]:
        return pack_examples(examples, max_seq_length) if packing else examples

    most = steps * batch_size
    take = most * 2
    while True:
        write_jsonl(path, pool[:take])
        examples = load_dataset(path, "chat", tokenizer, max_seq_length).examples
        if len(rows(examples)) > most or take >= len(pool):
            break
        take *= 2
    # Bisect for the first count that makes too many rows (packed rows grow with examples, near enough: the
    # count found is checked below).
    low, high = 1, len(examples)
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if len(rows(examples[:middle])) <= most else (low, middle)
    count = low - 1 if len(rows(examples[:low])) > most else low
    chosen = rows(examples[:count])
    if math.ceil(len(chosen) / batch_size) != steps:
        raise SystemExit(f"the data makes {math.ceil(len(chosen) / batch_size)} steps, not --steps {steps}")
    write_jsonl(path, pool[:count])
    return path, chosen


def sft_spec(workdir: Path, model_dir: Path, train: Path, **hyperparameters: Any) -> TrainingSpec:
    """An SFT job on chat data as the runner hands it over, without a validation file: the child then runs
    no evaluation, so its MetricsMessage.elapsed_seconds times the training steps alone."""
    return TrainingSpec.model_validate(
        {
            "job_id": f"ftjob-bench-{workdir.name}",
            "base_model_path": str(model_dir),
            "training_file": str(train),
            "data_format": "chat",
            "objective": "sft",
            "output_dir": str(workdir / "out"),
            "stop_file": str(workdir / "STOP"),
            "seed": SEED,
            "hyperparameters": {**LORA_HYPERPARAMETERS, **hyperparameters},
        }
    )


@dataclass
class ChildRun:
    messages: list[ChildMessage]
    received: list[float]
    """When each message arrived here (time.monotonic, the clock every process on the machine shares)."""
    usage: Any
    """The child's own resource usage (os.wait4): ru_maxrss is its peak resident set in KiB."""

    def of_type(self, cls: type[T]) -> list[T]:
        return [message for message in self.messages if isinstance(message, cls)]

    @property
    def completed(self) -> CompletedMessage:
        [completed] = self.of_type(CompletedMessage)
        return completed

    def training_window(self) -> tuple[float, float]:
        """Start and end of the training loop on the shared monotonic clock. The child times it from its
        start; each metrics message arrives at least its elapsed seconds after that start, so the start is
        the smallest arrival minus elapsed (pipe latency only ever makes that difference larger)."""
        metrics = [
            (received, message)
            for received, message in zip(self.received, self.messages, strict=True)
            if isinstance(message, MetricsMessage)
        ]
        start = min(received - message.elapsed_seconds for received, message in metrics)
        return start, start + metrics[-1][1].elapsed_seconds


class TrainingChild:
    """`python -m worker.training` as the runner starts it, reporting on an inherited pipe; its log (stdout
    and stderr) goes to workdir/train.log."""

    def __init__(self, spec: TrainingSpec, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        spec_path = workdir / "spec.json"
        spec_path.write_text(spec.model_dump_json(indent=2), encoding="utf-8")
        self.log = workdir / "train.log"
        read_fd, write_fd = os.pipe()
        command = [sys.executable, "-m", "worker.training", "--spec", str(spec_path)]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [*command, "--events-fd", str(write_fd)],
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=REPO,
                preexec_fn=die_with_parent,
            )
        os.close(write_fd)
        self.pid = self.process.pid
        self.eof = False
        self._events = os.fdopen(read_fd, "rb", buffering=0)
        self._buffer = b""
        self.messages: list[ChildMessage] = []
        self.received: list[float] = []

    def read(self, timeout: float) -> list[ChildMessage]:
        """The messages that arrive within `timeout` seconds (possibly none); sets `eof` once the child closed
        the pipe."""
        if self.eof or not select.select([self._events], [], [], timeout)[0]:
            return []
        chunk = self._events.read(1 << 16)
        if not chunk:
            self.eof = True
            self._events.close()
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        new = [_MESSAGES.validate_json(line) for line in lines if line.strip()]
        self.messages += new
        self.received += [time.monotonic()] * len(new)
        return new

    def wait(self) -> ChildRun:
        """Reap the child (after `eof`); raises with the log's tail unless it completed."""
        # wait4 rather than wait(): its rusage is this child's alone (RUSAGE_CHILDREN is a max over all).
        _, status, usage = os.wait4(self.pid, 0)
        self.process.returncode = os.waitstatus_to_exitcode(status)
        run = ChildRun(self.messages, self.received, usage)
        if self.process.returncode != 0 or not run.of_type(CompletedMessage):
            raise RuntimeError(
                f"training child failed (exit {self.process.returncode}); log tail:\n{log_tail(self.log)}"
            )
        return run


def run_child(
    spec: TrainingSpec, workdir: Path, on_message: Callable[[ChildMessage, int], None] | None = None
) -> ChildRun:
    """Train to the end; `on_message(message, pid)` sees each event as it arrives, the child still running."""
    child = TrainingChild(spec, workdir)
    while not child.eof:
        for message in child.read(timeout=1.0):
            if on_message is not None:
                on_message(message, child.pid)
    return child.wait()


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]


def machine_facts() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); 1-min load average at start {os.getloadavg()[0]:.2f}"
    )
