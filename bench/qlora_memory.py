"""QLoRA memory benchmark: peak resident memory of our training child with QLoRA against LoRA, without and
with gradient checkpointing, on SmolLM2-135M-Instruct, same batch and data. Not a test.

    python bench/qlora_memory.py [--steps 6] [--batch-size 4] [--max-seq-length 256] [--no-packing]
                                 [--model-dir DIR]

Each configuration trains `--steps` optimizer steps of the same training file (sentiment_chat, packed into
full rows by default) in its own child (`python -m worker.training`), one after the other, and is measured
the same way:
- peak: the child's own ru_maxrss from os.wait4, the kernel's high-water mark of its resident set;
- runtime: its VmRSS (/proc/<pid>/status) when it reports `started`: imports done, tokenizer and data
  loaded, model not yet (it loads right after, so this is read at once, before it can grow much);
- loaded: its VmRSS when it logs its trainable parameters (model loaded and prepared), and VmHWM then: the
  peak while loading;
- model-attributable: peak minus runtime, what the model costs on top of a constant Python + torch runtime.
"""

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where `api.py` would shadow the api package:
# swap it for the repository root, so that `bench._common` imports as it would from anywhere else.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from bench._common import (  # noqa: E402
    DATA,
    base_model,
    machine_facts,
    read_jsonl,
    run_child,
    sft_spec,
    training_file,
)
from models.spec import ChildMessage, LogMessage, MetricsMessage, StartedMessage  # noqa: E402
from worker.training.loading import load_tokenizer  # noqa: E402

TARGET = 0.5
MIB = 1024  # the kernel reports KiB


@dataclass(frozen=True)
class Config:
    name: str
    training_type: str
    gradient_checkpointing: bool


CONFIGS = [
    Config("LoRA", "lora", False),
    Config("LoRA + grad. checkpointing", "lora", True),
    # The method turns gradient checkpointing on itself; the flag stays at its default, as users send it.
    Config("QLoRA (nf4, checkpointing)", "qlora", False),
]


def proc_status_kib(pid: int) -> dict[str, int]:
    """A running process's resident set now (VmRSS), its most so far (VmHWM) and the part of it that maps
    files (RssFile: libraries, and a checkpoint read through mmap), in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssFile"):
            fields[name] = int(value.split()[0])
    return fields


@dataclass
class Probe:
    """The child's memory read at its events: `started` (runtime only), the trainable-parameters log line
    (model loaded and prepared) and each step's metrics (the last one's is kept)."""

    runtime: int = 0
    loaded: int = 0
    load_peak: int = 0
    file_backed: int = 0

    def __call__(self, message: ChildMessage, pid: int) -> None:
        if isinstance(message, StartedMessage):
            self.runtime = proc_status_kib(pid)["VmRSS"]
        elif isinstance(message, LogMessage) and message.message.endswith("parameters trainable"):
            status = proc_status_kib(pid)
            self.loaded, self.load_peak = status["VmRSS"], status["VmHWM"]
        elif isinstance(message, MetricsMessage):
            self.file_backed = proc_status_kib(pid)["RssFile"]


@dataclass
class Measured:
    config: Config
    probe: Probe
    peak: int
    seconds_per_step: float

    @property
    def model(self) -> int:
        """Peak minus runtime: what training this model costs above the constant Python + torch runtime."""
        return self.peak - self.probe.runtime


def measure(config: Config, tmp: Path, model_dir: Path, train: Path, args: argparse.Namespace) -> Measured:
    workdir = tmp / f"{config.training_type}-{'gc' if config.gradient_checkpointing else 'default'}"
    spec = sft_spec(
        workdir,
        model_dir,
        train,
        training_type=config.training_type,
        gradient_checkpointing=config.gradient_checkpointing,
        batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
        packing=args.packing,
    )
    probe = Probe()
    run = run_child(spec, workdir, probe)
    last = run.of_type(MetricsMessage)[-1]
    return Measured(config, probe, run.usage.ru_maxrss, last.elapsed_seconds / last.step)


def report(facts: str, data: str, results: list[Measured]) -> None:
    line = "=" * 110
    print(f"\n{line}\nMachine: {facts}\nData: {data}\n")
    print(
        f"{'MiB':<28}{'runtime':>9}{'loaded':>9}{'load peak':>11}{'file-backed':>13}{'peak RSS':>10}"
        f"{'model-attributable':>20}{'s/step':>8}"
    )
    for r in results:
        p = r.probe
        print(
            f"{r.config.name:<28}{p.runtime / MIB:>9.0f}{p.loaded / MIB:>9.0f}{p.load_peak / MIB:>11.0f}"
            f"{p.file_backed / MIB:>13.0f}{r.peak / MIB:>10.0f}{r.model / MIB:>20.0f}"
            f"{r.seconds_per_step:>8.1f}"
        )
    print(
        "(loaded: LoRA's weights are mapped from the checkpoint and only become resident when first used; "
        "file-backed: the\n resident mapped-file pages at the last step, libraries and checkpoint pages "
        "included, which peak RSS counts too.\n s/step: wall time, so it depends on what else the machine "
        "runs.)"
    )
    lora, lora_gc, qlora = results
    judged = qlora.model / lora_gc.model
    print(
        "\nJudged: model-attributable QLoRA / LoRA + gradient checkpointing. The runtime (Python, torch, "
        "tokenizer, data) costs\nthe same whatever the model, and checkpointing is on for QLoRA, so this "
        "leaves 4-bit weights as the only difference."
    )
    targets = [
        ("model-attr., QLoRA / LoRA + ckpt", judged, True),
        ("model-attr., QLoRA / LoRA", qlora.model / lora.model, False),
        ("peak RSS, QLoRA / LoRA + ckpt", qlora.peak / lora_gc.peak, False),
        ("peak RSS, QLoRA / LoRA", qlora.peak / lora.peak, False),
    ]
    print(f"\n{'figure':<36}{'value':>7}  {'target':<9}result")
    for name, value, is_judged in targets:
        result = ("PASS" if value <= TARGET else "FAIL") if is_judged else "(for reference)"
        print(f"{name:<36}{value:>7.2f}  {'<= ' + str(TARGET):<9}{result}")
    print(line)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per configuration")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="full rows of max-seq-length tokens (default), or the short examples one per row",
    )
    parser.add_argument("--model-dir", type=Path, help="default: the copy `ftjobs models pull` makes")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    facts = machine_facts()
    print(f"Machine: {facts}", flush=True)
    model_dir = base_model(args.model_dir)
    pool = read_jsonl(DATA / "sentiment_chat" / "train.jsonl")
    tokenizer = load_tokenizer(str(model_dir))
    with tempfile.TemporaryDirectory(prefix="ftjobs-bench-") as name:
        tmp = Path(name)
        train, rows = training_file(
            pool,
            tmp / "train.jsonl",
            tokenizer,
            args.steps,
            args.batch_size,
            args.max_seq_length,
            packing=args.packing,
        )
        n_examples = len(read_jsonl(train))
        results = []
        for config in CONFIGS:
            print(f"{config.name}: {args.steps} steps...", flush=True)
            results.append(measure(config, tmp, model_dir, train, args))
    shape = f"packed into {len(rows)} rows" if args.packing else "one per row"
    data = (
        f"sentiment_chat train, the first {n_examples} examples ({shape}, up to "
        f"{max(row.length for row in rows)} tokens): {args.steps} steps of batch {args.batch_size}"
    )
    report(facts, data, results)


if __name__ == "__main__":
    main()
