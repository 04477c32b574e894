"""Does the range test pick a good learning rate? One job body, run once with `learning_rate_multiplier:
"auto"` and once as a sweep over fixed multipliers, through the real API. Not a test.

    python bench/range_test_pick.py [--methods lora,full] [--train-limit 1000]
                                    [--multipliers 0.125,0.25,0.5,1,2,4,8] [--model-dir DIR] [--keep]

As a user would: `ftjobs up` (embedded, one worker), all-MiniLM-L6-v2 registered, the first
`--train-limit` shared sentiment training sentences as the training file and the shared validation file
as the validation file. Per method, the job body sets only `training_type` (so 3 epochs of batches of 8:
1,000 sentences make 375 steps, which affords an 18-step range test). First the "auto" job: its range test's
pick and the validation metric of what it published. Then `POST /v1/fine_tuning/sweeps` with the same
body and `search_space: {"learning_rate_multiplier": [--multipliers]}` (a grid: a trial per multiplier), no
early stopping: every trial's value, and the best. The check (issue 20): the pick
within a factor of 2 of the sweep's best multiplier.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

# Run as a script, this file's folder comes first on sys.path, where `api.py` would shadow the api package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from bench.methods_table import (  # noqa: E402
    DATA,
    MODEL,
    SEED,
    bench_api,
    follow,
    in_temp_dir,
    machine_facts,
    training_file,
    upload,
)


def body(method: str, files: tuple[str, str]) -> dict[str, Any]:
    return {
        "model": MODEL,
        "training_file": files[0],
        "validation_file": files[1],
        "seed": SEED,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"training_type": method}}},
    }


def auto_job(client: OpenAI, method: str, files: tuple[str, str], timeout: float) -> tuple[float, float, str]:
    """The range test's multiplier, the published model's metric value and the metric's name."""
    job = client.fine_tuning.jobs.create(**body(method, files))
    job = follow(client, job, timeout)
    if job.status != "succeeded":
        raise SystemExit(f"{method}: the auto job {job.id} {job.status}: {job.error}")
    extra = job.to_dict()
    picked = extra["method"]["supervised"]["hyperparameters"]["learning_rate_multiplier"]
    best = extra["evaluation"]["best_checkpoint"]
    return float(picked), float(best["value"]), str(best["metric"])


def sweep(
    http: httpx.Client, method: str, files: tuple[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    request = {
        **body(method, files),
        "search_space": {"learning_rate_multiplier": args.multipliers},
        "max_trials": len(args.multipliers),
        "parallelism": 1,  # one worker: a second trial would only wait
        "early_stopping": False,
    }
    created = http.post("/fine_tuning/sweeps", json=request)
    created.raise_for_status()
    found = created.json()
    while found["status"] == "running":
        time.sleep(5)
        found = http.get(f"/fine_tuning/sweeps/{found['id']}").raise_for_status().json()
    return found


def report(method: str, picked: float, auto_value: float, metric: str, found: dict[str, Any]) -> bool:
    print(f"\n{method}: sweep {found['id']} {found['status']}, {metric} ({found['direction']})")
    for trial in sorted(found["trials"], key=lambda t: t["params"]["learning_rate_multiplier"]):
        value = "-" if trial["value"] is None else f"{trial['value']:.4f}"
        print(
            f"  multiplier {trial['params']['learning_rate_multiplier']:8.3f}  {value:>8}  {trial['status']}"
        )
    best = found["best"]
    if best is None:
        print("  no trial has a value")
        return False
    ratio = picked / best["params"]["learning_rate_multiplier"]
    within = 0.5 <= ratio <= 2
    print(
        f"  sweep best: multiplier {best['params']['learning_rate_multiplier']:.3f} ({best['value']:.4f}); "
        f"range test: {picked:.3g} ({auto_value:.4f}); pick / best = {ratio:.2f}: "
        f"{'within' if within else 'NOT within'} a factor of 2"
    )
    return within


def run(args: argparse.Namespace, tmp: Path) -> None:
    print(f"Machine: {machine_facts()}", flush=True)
    started = time.monotonic()
    verdicts = {}
    with bench_api(tmp / "data", {MODEL: args.model_dir}) as (base_url, api_key):
        client = OpenAI(base_url=base_url, api_key=api_key)
        http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60)
        files = (
            upload(client, training_file(tmp, args.train_limit)),
            upload(client, DATA / "validation.jsonl"),
        )
        for method in args.methods:
            print(f"{method}: the auto job ...", flush=True)
            picked, auto_value, metric = auto_job(client, method, files, args.job_timeout)
            print(f"  range test picked {picked:.3g}; published {metric} {auto_value:.4f}", flush=True)
            print(f"{method}: the sweep over {args.multipliers} ...", flush=True)
            verdicts[method] = report(method, picked, auto_value, metric, sweep(http, method, files, args))
    print(
        f"\n{args.train_limit:,} training sentences, seed {SEED}; {time.monotonic() - started:.0f} s in all; "
        + ", ".join(f"{m}: {'within' if ok else 'NOT within'}" for m, ok in verdicts.items())
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="lora,full", help="comma-separated training types")
    parser.add_argument("--train-limit", type=int, default=1000, help="first N training sentences")
    parser.add_argument(
        "--multipliers", default="0.125,0.25,0.5,1,2,4,8", help="the sweep's grid of fixed multipliers"
    )
    parser.add_argument(
        "--job-timeout", type=float, default=3600, help="seconds before the auto job is cancelled"
    )
    parser.add_argument("--model-dir", type=Path, help=f"an existing copy of {MODEL} (default: pull)")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir (logs, artifacts)")
    args = parser.parse_args()
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    args.multipliers = [float(value) for value in args.multipliers.split(",")]
    return args


def main() -> None:
    args = parse_args()
    in_temp_dir("ftjobs-pick-", args.keep, lambda tmp: run(args, tmp))


if __name__ == "__main__":
    main()
