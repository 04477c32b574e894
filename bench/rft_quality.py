"""Does reinforcement fine-tuning work? An RFT LoRA job on SmolLM2-135M-Instruct over the shared sentiment
chat data (prompts without their answer), graded by a string_check that scores 1 when the answer is exactly
the label, run by the real training child with the service's defaults (what a job resolves "auto" to).
Prints the validation mean reward before training and at every evaluation, and the wall time.

    python bench/rft_quality.py                                  # the issue's run: 200 prompts, defaults
    python bench/rft_quality.py --prompts 40 --valid 40 --epochs 1 --max-completion-tokens 8   # short

Target (issue 19): validation mean reward from the base's ~0.15 to >= 0.6 with 200 prompts. Not a test.
"""

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import DATA, SEED, base_model, machine_facts, read_jsonl, run_child, write_jsonl
from models.hyperparameters import ReinforcementHyperparameters, resolve
from models.spec import ChildMessage, EvaluationMessage, MetricsMessage, TrainingSpec

GRADER = {
    "type": "string_check",
    "name": "label",
    "input": "{{sample.output_text}}",
    "reference": "{{item.label}}",
    "operation": "eq",
}


def prompts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat examples as reinforcement prompts: the conversation without the answer, the answer as `label`."""
    return [{"messages": row["messages"][:-1], "label": row["messages"][-1]["content"]} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, help="SmolLM2-135M-Instruct (default: ftjobs' pulled copy)")
    parser.add_argument("--prompts", type=int, default=200, help="training prompts")
    parser.add_argument("--valid", type=int, default=100, help="validation prompts")
    parser.add_argument("--epochs", type=int, help="n_epochs (default: auto)")
    parser.add_argument("--max-completion-tokens", type=int, help="default: the service's")
    parser.add_argument("--workdir", type=Path, help="kept for inspection (default: a temporary directory)")
    args = parser.parse_args()

    model_dir = base_model(args.model_dir)
    print(machine_facts(), flush=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rft-quality-"))
    train = write_jsonl(
        workdir / "train.jsonl", prompts(read_jsonl(DATA / "sentiment_chat" / "train.jsonl"))[: args.prompts]
    )
    valid = write_jsonl(
        workdir / "valid.jsonl",
        prompts(read_jsonl(DATA / "sentiment_chat" / "validation.jsonl"))[: args.valid],
    )
    overrides = {
        key: value
        for key, value in {
            "n_epochs": args.epochs,
            "max_completion_tokens": args.max_completion_tokens,
        }.items()
        if value is not None
    }
    hyperparameters = resolve(ReinforcementHyperparameters(**overrides), args.prompts, "grpo")
    print(f"hyperparameters: {hyperparameters.model_dump_json()}", flush=True)
    spec = TrainingSpec(
        job_id="ftjob-bench-rft",
        base_model_path=str(model_dir),
        training_file=str(train),
        validation_file=str(valid),
        data_format="prompts",
        objective="grpo",
        output_dir=str(workdir / "out"),
        stop_file=str(workdir / "STOP"),
        seed=SEED,
        hyperparameters=hyperparameters,
        grader=GRADER,
    )
    started = time.monotonic()

    def report(message: ChildMessage, _pid: int) -> None:
        elapsed = time.monotonic() - started
        if isinstance(message, EvaluationMessage):
            reward = message.metrics["full_valid_mean_reward"]
            print(
                f"[{elapsed:7.0f}s] step {message.step:4d}: validation mean reward {reward:.3f}", flush=True
            )
        elif isinstance(message, MetricsMessage):
            reward = message.metrics["train_mean_reward"]
            print(f"[{elapsed:7.0f}s] step {message.step}/{message.total_steps}: train reward {reward:.3f}")

    run = run_child(spec, workdir / "job", report)
    curve = [(m.step, round(m.metrics["full_valid_mean_reward"], 3)) for m in run.of_type(EvaluationMessage)]
    print(f"wall time {time.monotonic() - started:.0f} s; validation curve (step, reward): {curve}")


if __name__ == "__main__":
    main()
