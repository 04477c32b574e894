"""Weak scaling of one job on 1 vs 2 ranks: LoRA (data-parallel) and full fine-tuning (FSDP2) of
SmolLM2-135M-Instruct, each rank on one thread with the same per-rank batch, so 2 ranks train twice the
tokens per step. Not a test.

    python bench/distributed.py [--rounds 5] [--steps 8] [--per-rank-batch 2] [--max-seq-length 128]
                                [--model-dir DIR]

Every run is the real training child as the runner starts it (`worker.child.TrainingProcess`: the plain
child on 1 rank, torch's launcher on 2), on a chat file of equal-length rows and no validation file, so the
child's CompletedMessage times its training loop alone (model loading and launcher start-up excluded):
tokens/s = trained_tokens / elapsed_seconds. The four configurations run one after another in each round,
the order reversed every other round, so whatever else loads the machine falls on all of them; the medians
over rounds give the efficiency tok/s(2) / (2 x tok/s(1)). On a CPU the 2 ranks share the machine's cores:
with 2 free cores this is the parallel efficiency of the distributed path; with fewer, it is not.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, where `api.py` would shadow the api package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench._common import MODEL, base_model, sft_spec  # noqa: E402
from models.spec import CompletedMessage, TrainingSpec  # noqa: E402
from worker.child import TrainingProcess  # noqa: E402

CONFIGS = [("lora", 1), ("lora", 2), ("full", 1), ("full", 2)]
LEARNING_RATES = {"lora": 2e-4, "full": 2e-5}


def chat_file(path: Path, rows: int, words: int) -> Path:
    """`rows` chat examples of the same length (`words` words of answer), so every step trains as many
    tokens on every world size."""
    lines = []
    for i in range(rows):
        answer = " ".join(f"word{(i * 7 + k) % 97}" for k in range(words))
        messages = [
            {"role": "user", "content": f"Repeat list {i}."},
            {"role": "assistant", "content": answer},
        ]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def spec(workdir: Path, model_dir: Path, train: Path, method: str, ranks: int, args: Any) -> TrainingSpec:
    job = sft_spec(
        workdir,
        model_dir,
        train,
        training_type=method,
        learning_rate=LEARNING_RATES[method],
        batch_size=args.per_rank_batch * ranks,  # weak scaling: the same share per rank
        max_seq_length=args.max_seq_length,
        lora_dropout=0.0,
    )
    workdir.mkdir(parents=True)
    return job.model_copy(update={"devices": ranks})


def run(spec: TrainingSpec) -> float:
    """Tokens per second of the training loop."""
    child = TrainingProcess(spec, Path(spec.stop_file).parent)
    completed: list[CompletedMessage] = []
    while not child.finished:
        completed += [m for m in child.messages(timeout=1.0) if isinstance(m, CompletedMessage)]
    if child.process.returncode != 0 or not completed or not completed[0].elapsed_seconds:
        raise SystemExit(f"{spec.job_id} failed:\n{child.log_tail()}")
    return completed[0].trained_tokens / completed[0].elapsed_seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--per-rank-batch", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--model-dir", type=Path, help=f"default: the pulled {MODEL}")
    args = parser.parse_args()
    model_dir = base_model(args.model_dir)
    os.environ["HF_HUB_OFFLINE"] = "1"
    # One thread per rank on both sides: the ranks of a launched job get one, the plain 1-rank child would
    # otherwise take every core (and on this VM run slower for it: scaleout.md §1.7).
    os.environ["OMP_NUM_THREADS"] = "1"
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    rates: dict[tuple[str, int], list[float]] = {config: [] for config in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        root = Path(tmp)
        # Enough rows for `steps` steps of the largest global batch; smaller batches stop at `steps` too.
        train = chat_file(
            root / "train.jsonl", args.steps * args.per_rank_batch * 2, args.max_seq_length // 3
        )
        for round_ in range(args.rounds):
            order = CONFIGS if round_ % 2 == 0 else CONFIGS[::-1]
            for method, ranks in order:
                workdir = root / f"{method}-{ranks}-{round_}"
                job = spec(workdir, model_dir, train, method, ranks, args)
                # Every run trains `steps` steps: the file is cut to this run's global batch.
                rows = (
                    (root / "train.jsonl")
                    .read_text()
                    .splitlines()[: args.steps * job.hyperparameters.batch_size]
                )
                rows_path = workdir / "train.jsonl"
                rows_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
                job = job.model_copy(update={"training_file": str(rows_path)})
                started = time.monotonic()
                rate = run(job)
                rates[(method, ranks)].append(rate)
                print(
                    f"round {round_ + 1} {method} x{ranks}: {rate:,.0f} tok/s "
                    f"(run {time.monotonic() - started:.0f} s, load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    medians = {config: statistics.median(values) for config, values in rates.items()}
    efficiency = {method: medians[(method, 2)] / (2 * medians[(method, 1)]) for method in ("lora", "full")}
    for (method, ranks), median in medians.items():
        print(f"median {method} x{ranks}: {median:,.0f} tok/s over {len(rates[(method, ranks)])} runs")
    print(
        f"weak-scaling efficiency tok/s(2)/(2 x tok/s(1)): lora/DDP {efficiency['lora']:.2f}, "
        f"full/FSDP2 {efficiency['full']:.2f}"
    )


if __name__ == "__main__":
    main()
