"""What a user gets from the service's defaults, scored on sentences the job never saw (issue 20's quality
targets), through the real API as a user would. Not a test.

    python bench/defaults_quality.py [--runs minilm-full,minilm-lora,minilm-feature-extraction,smollm2-lora]
                                     [--heldout 1000] [--set KEY=JSON ...] [--minilm-dir DIR]
                                     [--smollm2-dir DIR] [--no-base] [--keep]

Data (../shared/data/sentiment): the last `--heldout` (1,000) of the 7,662 training sentences are held back
and never uploaded. MiniLM (all-MiniLM-L6-v2) jobs train on the other 6,662 with the shared validation file
(1,000) as their validation file, which picks the published checkpoint; SmolLM2-135M-Instruct trains on
sentiment_chat (the first 400 training sentences as chat) with its 100 validation conversations. Each job
sends only its `training_type`: the learning rate (range test), epochs, batch size and what is published
are the service's "auto". The published model then answers every held-back sentence: MiniLM through
`/v1/classifications`, SmolLM2 through `/v1/chat/completions` (greedy, sentiment_chat's system prompt, the
answer compared with the label after trimming whitespace, as the job's own exact_match does); the untuned
SmolLM2 base answers them too, for reference. `--set KEY=JSON` adds a hyperparameter to every job, to
measure a candidate default beside the current one.

Targets (issue 20): held-out accuracy of MiniLM full >= 85 %, LoRA >= 83 %, feature extraction >= 75 %;
SmolLM2 exact answers >= 0.85.
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob

# Run as a script, this file's folder comes first on sys.path, where `api.py` would shadow the api package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from bench._common import DATA, read_jsonl, write_jsonl  # noqa: E402
from bench.methods_table import (  # noqa: E402
    SEED,
    bench_api,
    follow,
    in_temp_dir,
    machine_facts,
    resolved_summary,
    upload,
)
from models.inference import MAX_PROMPTS  # noqa: E402

MINILM = "all-minilm-l6-v2"
SMOLLM2 = "smollm2-135m-instruct"
CHAT_CLIENTS = 8
"""Concurrent chat requests while scoring: the inference server batches them."""


@dataclass(frozen=True)
class Run:
    model: str
    training_type: str
    target: float


RUNS = {
    "minilm-full": Run(MINILM, "full", 0.85),
    "minilm-lora": Run(MINILM, "lora", 0.83),
    "minilm-feature-extraction": Run(MINILM, "feature_extraction", 0.75),
    "smollm2-lora": Run(SMOLLM2, "lora", 0.85),
}


@dataclass(frozen=True)
class Sentences:
    """The held-back test sentences, and the files the jobs upload."""

    heldout: list[dict[str, Any]]
    files: dict[str, tuple[Path, Path]]
    """Per base model: its training and validation files."""
    system_prompt: str


def prepare(tmp: Path, heldout: int) -> Sentences:
    train = read_jsonl(DATA / "sentiment" / "train.jsonl")
    chat_train = DATA / "sentiment_chat" / "train.jsonl"
    kept, held = train[:-heldout], train[-heldout:]
    # sentiment_chat is the head of the sentiment files: none of the held-back tail is in it.
    chat_texts = {row["messages"][-2]["content"] for row in read_jsonl(chat_train)}
    if overlap := chat_texts & {row["text"] for row in held}:
        raise SystemExit(f"{len(overlap)} held-back sentences are in {chat_train}")
    return Sentences(
        heldout=held,
        files={
            MINILM: (write_jsonl(tmp / "minilm-train.jsonl", kept), DATA / "sentiment" / "validation.jsonl"),
            SMOLLM2: (chat_train, DATA / "sentiment_chat" / "validation.jsonl"),
        },
        system_prompt=read_jsonl(chat_train)[0]["messages"][0]["content"],
    )


def classification_accuracy(base_url: str, api_key: str, model: str, rows: list[dict[str, Any]]) -> float:
    right = 0
    for start in range(0, len(rows), MAX_PROMPTS):  # the most inputs the route takes at once
        batch = rows[start : start + MAX_PROMPTS]
        response = httpx.post(
            f"{base_url}/classifications",
            json={"model": model, "input": [row["text"] for row in batch]},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=600,
        )
        response.raise_for_status()
        right += sum(
            got["label"] == row["label"] for got, row in zip(response.json()["data"], batch, strict=True)
        )
    return right / len(rows)


def chat_exact_match(client: OpenAI, model: str, rows: list[dict[str, Any]], system_prompt: str) -> float:
    def answer(row: dict[str, Any]) -> bool:
        completion = client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": system_prompt}, {"role": "user", "content": row["text"]}],
            temperature=0,
            max_tokens=8,
        )
        return (completion.choices[0].message.content or "").strip() == row["label"]

    with ThreadPoolExecutor(CHAT_CLIENTS) as pool:
        return sum(pool.map(answer, rows)) / len(rows)


def train(
    client: OpenAI, run: Run, files: tuple[str, str], overrides: dict[str, Any], timeout: float
) -> FineTuningJob:
    training, validation = files
    job = client.fine_tuning.jobs.create(
        model=run.model,
        training_file=training,
        validation_file=validation,
        seed=SEED,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"training_type": run.training_type, **overrides}},
        },  # type: ignore[typeddict-item]
    )
    return follow(client, job, timeout)


def summary(job: FineTuningJob) -> str:
    """What the defaults resolved to and what was published, from the job object."""
    extra = job.to_dict()
    hp: dict[str, Any] = extra.get("method", {}).get("supervised", {}).get("hyperparameters", {})
    best = (extra.get("evaluation") or {}).get("best_checkpoint") or {}
    wall = f"{job.finished_at - job.created_at} s" if job.finished_at else "-"
    picked = (
        ""
        if hp.get("training_type") == "feature_extraction"
        else f"multiplier {hp.get('learning_rate_multiplier')}, "
    )
    return (
        picked
        + resolved_summary(hp)
        + f"; publish={extra.get('publish')}, published_step={extra.get('published_step')}"
        + (f" ({best.get('metric')}={best.get('value'):.4f})" if best else "")
        + f"; wall {wall}"
    )


def run_all(args: argparse.Namespace, tmp: Path) -> None:
    print(f"Machine: {machine_facts()}", flush=True)
    started = time.monotonic()
    data = prepare(tmp, args.heldout)
    copies = {MINILM: args.minilm_dir, SMOLLM2: args.smollm2_dir}
    models = {RUNS[name].model for name in args.runs}
    results: list[tuple[str, float | None, float | None, str]] = []
    with bench_api(tmp / "data", {model: copies[model] for model in models}) as (base_url, api_key):
        client = OpenAI(base_url=base_url, api_key=api_key, timeout=600)
        uploaded = {
            model: (upload(client, a), upload(client, b))
            for model, (a, b) in data.files.items()
            if model in models
        }
        if SMOLLM2 in models and not args.no_base:
            base = chat_exact_match(client, SMOLLM2, data.heldout, data.system_prompt)
            print(f"smollm2 base (untuned): held-out exact answers {base:.3f}", flush=True)
            results.append(("smollm2-base", base, None, "the registered base, no job"))
        for name in args.runs:
            run = RUNS[name]
            print(f"{name}: training ...", flush=True)
            job = train(client, run, uploaded[run.model], args.set, args.job_timeout)
            if job.status != "succeeded" or job.fine_tuned_model is None:
                results.append((name, None, run.target, f"{job.status}: {job.error}"))
                print(f"  {job.id} {job.status}: {job.error}", flush=True)
                continue
            model = job.fine_tuned_model
            scored = (
                chat_exact_match(client, model, data.heldout, data.system_prompt)
                if run.model == SMOLLM2
                else classification_accuracy(base_url, api_key, model, data.heldout)
            )
            results.append((name, scored, run.target, f"{job.id}: {summary(job)}"))
            print(f"  {job.id}: held-out {scored:.4f} (target {run.target}); {summary(job)}", flush=True)
    print(
        f"\nHeld-out: {len(data.heldout):,} sentences the jobs never saw; seed {SEED}; "
        f"{time.monotonic() - started:.0f} s in all"
    )
    print(f"Machine at end: 1-min load average {os.getloadavg()[0]:.2f}\n")
    print(f"{'run':<28}{'held-out':>9}{'target':>8}  ")
    for name, scored, target, detail in results:
        verdict = "" if target is None or scored is None else ("met" if scored >= target else "NOT met")
        print(
            f"{name:<28}{'-' if scored is None else format(scored, '.4f'):>9}"
            f"{'-' if target is None else format(target, '.2f'):>8}  {verdict:<8}{detail}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument(
        "--heldout", type=int, default=1000, help="training sentences held back as the test set"
    )
    parser.add_argument("--minilm-dir", type=Path, help=f"an existing copy of {MINILM} (default: pull)")
    parser.add_argument("--smollm2-dir", type=Path, help=f"an existing copy of {SMOLLM2} (default: pull)")
    parser.add_argument("--job-timeout", type=float, default=7200, help="seconds before a job is cancelled")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a hyperparameter every job sets besides training_type (to measure another default)",
    )
    parser.add_argument("--no-base", action="store_true", help="skip scoring the untuned SmolLM2 base")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir (logs, artifacts)")
    args = parser.parse_args()
    args.set = {key: json.loads(value) for key, _, value in (item.partition("=") for item in args.set)}
    args.runs = [name.strip() for name in args.runs.split(",") if name.strip()]
    if unknown := [name for name in args.runs if name not in RUNS]:
        raise SystemExit(f"--runs: unknown {', '.join(unknown)}; known: {', '.join(RUNS)}")
    return args


def main() -> None:
    args = parse_args()
    in_temp_dir("ftjobs-quality-", args.keep, lambda tmp: run_all(args, tmp))


if __name__ == "__main__":
    main()
