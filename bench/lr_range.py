"""The learning-rate range test of `learning_rate_multiplier: "auto"` on a real model, per method: what it
picks, its curve and what it costs. Not a test.

    python bench/lr_range.py [--methods lora full] [--epochs 10] [--batch-size 4] [--max-seq-length 128]
                             [--model-dir DIR]

Each method sets up a job in this process (`Recipe.setup`: the model loaded, the test run, the weights put
back) on sentiment_chat's 400 training examples; with the defaults the job would train 1,000 steps, so the
test's budget is its maximum of 48 steps (192 examples, 4.8 % of the 4,000 the job trains on).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where `api.py` would shadow the api package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from bench._common import DATA, base_model, machine_facts, sft_spec  # noqa: E402
from models.spec import METHODS, ChildMessage, LearningRateMessage, LogMessage  # noqa: E402
from worker.training.events import EventWriter  # noqa: E402
from worker.training.recipe import Recipe  # noqa: E402


class Timed(EventWriter):
    """Every message the recipe emits, with when it came."""

    def __init__(self) -> None:
        super().__init__(None)
        self.messages: list[tuple[float, ChildMessage]] = []

    def emit(self, message: ChildMessage) -> None:
        self.messages.append((time.monotonic(), message))


def measure(method: str, model: Path, workdir: Path, args: argparse.Namespace) -> None:
    base = METHODS[method].base_learning_rate
    spec = sft_spec(
        workdir,
        model,
        DATA / "sentiment_chat" / "train.jsonl",
        training_type=method,
        n_epochs=args.epochs,
        batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
        learning_rate=base,
        learning_rate_search=True,
    )
    events = Timed()
    Recipe(spec, events).setup()
    # The test runs between the "parameters trainable" log (model ready) and its own message.
    ready = next(at for at, m in events.messages if isinstance(m, LogMessage) and "trainable" in m.message)
    at, found = next((at, m) for at, m in events.messages if isinstance(m, LearningRateMessage))
    print(
        f"{method}: multiplier {found.learning_rate_multiplier:g} (learning rate {found.learning_rate:.3g}, "
        f"base {base:g}); found={found.found}: {found.reason}\n"
        f"  cost: {found.steps} steps of {found.budget_steps} allowed, {found.examples} examples of "
        f"{found.planned_examples} ({found.cost:.1%}), {at - ready:.1f} s wall "
        f"({(at - ready) / max(1, found.steps):.2f} s a step); diverged at {found.diverged_at}"
    )
    curve = ", ".join(f"{rate:.2g}:{loss:.3f}" for rate, loss in zip(found.rates, found.losses, strict=True))
    print(f"  curve (rate:smoothed loss): {curve}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["lora", "full"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--model-dir", type=Path)
    args = parser.parse_args()
    model = base_model(args.model_dir)
    print(machine_facts(), flush=True)
    for method in args.methods:
        with tempfile.TemporaryDirectory() as workdir:
            measure(method, model, Path(workdir), args)


if __name__ == "__main__":
    main()
