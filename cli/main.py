"""The `ftjobs` command: run the service, manage base models, and drive the API like the openai client."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from openai import OpenAI
from sqlalchemy.orm import Session, sessionmaker

from cli.follow import follow
from models.auth import ApiKeys, InvalidName, Organizations
from models.db import session_scope
from models.migrate import open_database
from models.queue import CeleryDispatcher
from models.registry import InvalidModelName, ModelRegistry
from models.settings import Settings
from worker.child import die_with_parent
from worker.reconciler import Reconciler

app = typer.Typer(help="Self-hosted, OpenAI-compatible fine-tuning jobs.", no_args_is_help=True)
models_app = typer.Typer(help="Base models jobs can fine-tune.", no_args_is_help=True)
files_app = typer.Typer(help="Training files.", no_args_is_help=True)
jobs_app = typer.Typer(help="Fine-tuning jobs.", no_args_is_help=True)
keys_app = typer.Typer(
    help="Organisations' API keys (run on the server: it opens the database).", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")

DataDir = Annotated[Path | None, typer.Option(help="Data directory (default: $FTJOBS_DATA_DIR or ./data).")]
BaseUrl = Annotated[str, typer.Option(envvar="FTJOBS_BASE_URL", help="The API's base URL.")]
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def _settings(data_dir: Path | None = None, **overrides: object) -> Settings:
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    return Settings(**overrides)  # type: ignore[arg-type]


def _client(base_url: str) -> OpenAI:
    """The official client, with the key in OPENAI_API_KEY as it reads it itself."""
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        raise typer.BadParameter(
            "set OPENAI_API_KEY to an organisation's key (`ftjobs keys create --org NAME` makes one)"
        )
    return OpenAI(base_url=base_url, api_key=key)


def _print(obj: object) -> None:
    typer.echo(json.dumps(obj.model_dump() if hasattr(obj, "model_dump") else obj, indent=2))


@app.command()
def up(
    host: str = "127.0.0.1",
    port: int = 8000,
    inference_port: Annotated[int, typer.Option(help="The inference server's port (0: any free one).")] = 0,
    data_dir: DataDir = None,
) -> None:
    """Run everything on one machine: API + in-process dispatcher, SQLite, local artifacts, and an inference
    server in a child process."""
    import uvicorn

    from api.main import create_app
    from worker.embedded import EmbeddedDispatcher
    from worker.runtime import make_runner

    inference_port = inference_port or _free_port()
    token = secrets.token_urlsafe(32)  # so only this API's requests reach its inference server
    settings = _settings(data_dir, inference_url=f"http://127.0.0.1:{inference_port}", inference_token=token)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    runner = make_runner(settings)
    _announce_admin_key(settings, runner.session_factory)
    dispatcher = EmbeddedDispatcher(runner, runner.session_factory, workers=settings.embedded_workers)
    dispatcher.start()
    Reconciler(settings, runner.session_factory, dispatcher).start()
    # Models load in their own process, so a long generation never stalls the API's event loop.
    inference = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(inference_port), "--log-level", "warning"],
        env={**os.environ, "FTJOBS_DATA_DIR": str(settings.data_dir), "FTJOBS_INFERENCE_TOKEN": token},
        preexec_fn=die_with_parent,
    )
    typer.echo(
        f"ftjobs (embedded) on http://{host}:{port}/v1, inference server on {settings.inference_url}, "
        f"data in {settings.data_dir.resolve()}"
    )
    try:
        uvicorn.run(create_app(settings, dispatcher), host=host, port=port, log_level="warning")
    finally:
        inference.terminate()
        dispatcher.stop()


@app.command()
def api(host: str = "0.0.0.0", port: int = 8000, workers: int = 1) -> None:
    """Run the API alone (distributed mode): jobs are enqueued to Celery workers."""
    import uvicorn

    settings = _settings()
    _announce_admin_key(settings, _start_reconciler(settings))
    uvicorn.run("api.asgi:app", host=host, port=port, workers=workers, log_level="info")


@app.command()
def serve(
    host: str = "127.0.0.1", port: int = 8001, log_level: str = "info", data_dir: DataDir = None
) -> None:
    """Run an inference server (the API forwards to FTJOBS_INFERENCE_URL): each base model loads once,
    fine-tuned adapters attach per request."""
    from inference.app import serve as serve_models

    serve_models(_settings(data_dir), host=host, port=port, log_level=log_level)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@app.command()
def worker(loglevel: str = "info") -> None:
    """Run a Celery worker that trains jobs (one at a time; run one per GPU)."""
    from worker.tasks import app as celery_app

    settings = _settings()
    _start_reconciler(settings)
    celery_app.worker_main(
        ["worker", "--pool=solo", f"--queues={settings.worker_queue}", f"--loglevel={loglevel}"]
    )


def _start_reconciler(settings: Settings) -> sessionmaker[Session]:
    """Migrate, then sweep for lost jobs in the background (distributed mode: every process does)."""
    factory = open_database(settings)
    Reconciler(settings, factory, CeleryDispatcher(settings)).start()
    return factory


@models_app.command("pull")
def models_pull(name: str, data_dir: DataDir = None) -> None:
    """Fetch a base model (offline for the built-ins) and register it."""
    from worker.model_pull import PullError, pull

    settings = _settings(data_dir)
    try:
        path = pull(name, settings.models_root)
    except PullError as error:
        raise typer.BadParameter(str(error), param_hint="NAME") from error
    _register(settings, name, path, source=f"pull:{name}")


@models_app.command("add")
def models_add(name: str, path: Path, data_dir: DataDir = None) -> None:
    """Register a local Hugging Face directory (safetensors) under NAME."""
    from worker.model_pull import PullError, check_model_dir

    try:
        check_model_dir(path)
    except PullError as error:
        raise typer.BadParameter(str(error), param_hint="PATH") from error
    _register(_settings(data_dir), name, path.resolve(), source="local")


@models_app.command("list")
def models_list(data_dir: DataDir = None) -> None:
    """List registered base models."""
    with session_scope(open_database(_settings(data_dir))) as session:
        for entry in ModelRegistry(session).list():
            typer.echo(f"{entry.name}\t{entry.path}")


@keys_app.command("create")
def keys_create(
    org: Annotated[str | None, typer.Option(help="The organisation's name (made if new).")] = None,
    name: Annotated[str, typer.Option(help="What the key is for.")] = "",
    admin: Annotated[bool, typer.Option(help="An admin key (manages organisations and keys).")] = False,
    data_dir: DataDir = None,
) -> None:
    """Make an API key and print it (only stdout: `KEY=$(ftjobs keys create --org acme)`). It is shown
    this once."""
    if (org is None) == (not admin):
        raise typer.BadParameter("give --org NAME, or --admin")
    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with session_scope(open_database(settings)) as session:
        organization = None
        if org is not None:
            try:
                organization = Organizations(session).named(org)
            except InvalidName as error:
                raise typer.BadParameter(str(error), param_hint="--org") from error
            typer.echo(f"organization {org} ({organization.id})", err=True)
        row, key = ApiKeys(session).create(organization, name)
    typer.echo(f"created key {row.id} ({row.redacted}); it is not shown again", err=True)
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    org: Annotated[str | None, typer.Option(help="Only this organisation's keys.")] = None,
    data_dir: DataDir = None,
) -> None:
    """List keys (never their values): id, organisation, name, redacted key, created, last used, revoked."""
    with session_scope(open_database(_settings(data_dir))) as session:
        organizations = {o.id: o.name for o in Organizations(session).list()}
        only = next((i for i, n in organizations.items() if n == org), "") if org else None
        for key in ApiKeys(session).list(only):
            owner = organizations.get(key.organization_id, "?") if key.organization_id else "(admin)"
            times = [_time(key.created_at), _time(key.last_used_at), _time(key.revoked_at)]
            typer.echo("\t".join([key.id, owner, key.name or "-", key.redacted, *times]))


@keys_app.command("revoke")
def keys_revoke(key_id: str, data_dir: DataDir = None) -> None:
    """Revoke a key: its next request gets a 401."""
    with session_scope(open_database(_settings(data_dir))) as session:
        keys = ApiKeys(session)
        key = keys.get(key_id)
        if key is None:
            raise typer.BadParameter(f"no key {key_id!r}", param_hint="KEY_ID")
        keys.revoke(key)
    typer.echo(f"revoked {key_id}")


def _time(seconds: int | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)) if seconds else "-"


def _announce_admin_key(settings: Settings, factory: sessionmaker[Session]) -> None:
    """First start (no FTJOBS_ADMIN_KEY, no admin key yet): make one and show it, this once."""
    if settings.admin_key is not None:
        return
    with session_scope(factory) as session:
        key = ApiKeys(session).ensure_admin_key()
    if key is not None:
        typer.echo(
            f"Admin key (manages organisations and keys; shown once, not stored): {key}\n"
            "Make an organisation's key with `ftjobs keys create --org NAME` or POST "
            "/v1/admin/organizations/{id}/api_keys.",
            err=True,
        )


def _register(settings: Settings, name: str, path: Path, *, source: str) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with session_scope(open_database(settings)) as session:
        try:
            ModelRegistry(session).register(name, str(path), source)
        except InvalidModelName as error:
            raise typer.BadParameter(str(error), param_hint="NAME") from error
    typer.echo(f"registered {name} -> {path}")


@files_app.command("upload")
def files_upload(path: Path, purpose: str = "fine-tune", base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Upload a JSONL file."""
    with open(path, "rb") as source:
        _print(_client(base_url).files.create(file=source, purpose=purpose))  # type: ignore[arg-type]


@files_app.command("list")
def files_list(base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """List files."""
    for file in _client(base_url).files.list():
        typer.echo(f"{file.id}\t{file.purpose}\t{file.bytes}\t{file.filename}")


@files_app.command("get")
def files_get(file_id: str, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Show a file's metadata."""
    _print(_client(base_url).files.retrieve(file_id))


@files_app.command("content")
def files_content(
    file_id: str,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Download a file's bytes (e.g. a job's results CSV)."""
    content = _client(base_url).files.content(file_id)
    if output is None:
        typer.echo(content.text, nl=False)
    else:
        content.write_to_file(output)


@files_app.command("delete")
def files_delete(file_id: str, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Delete a file."""
    _print(_client(base_url).files.delete(file_id))


@jobs_app.command("create")
def jobs_create(
    model: Annotated[str, typer.Option()],
    training_file: Annotated[str, typer.Option()],
    validation_file: str | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    method: Annotated[
        str, typer.Option(help="supervised, dpo or reward_model; the file's format picks the objective.")
    ] = "supervised",
    hyperparameter: Annotated[
        list[str] | None, typer.Option("--hyperparameter", "-p", help="KEY=VALUE (JSON value), repeatable.")
    ] = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Create a fine-tuning job (docs/api.md lists the hyperparameters, e.g. -p training_type=qlora)."""
    hyperparameters = {}
    for item in hyperparameter or []:
        key, _, raw = item.partition("=")
        try:
            hyperparameters[key] = json.loads(raw)
        except json.JSONDecodeError:
            hyperparameters[key] = raw
    job = _client(base_url).fine_tuning.jobs.create(
        model=model,
        training_file=training_file,
        validation_file=validation_file,
        suffix=suffix,
        seed=seed,
        method={"type": method, method: {"hyperparameters": hyperparameters}},  # type: ignore[misc]
    )
    _print(job)


@jobs_app.command("list")
def jobs_list(limit: int = 20, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """List jobs, newest first."""
    for job in _client(base_url).fine_tuning.jobs.list(limit=limit).data:
        typer.echo(f"{job.id}\t{job.status}\t{job.model}\t{job.fine_tuned_model or ''}")


@jobs_app.command("get")
def jobs_get(job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Show a job."""
    _print(_client(base_url).fine_tuning.jobs.retrieve(job_id))


@jobs_app.command("events")
def jobs_events(job_id: str, limit: int = 20, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Show a job's events, oldest first."""
    for event in reversed(_client(base_url).fine_tuning.jobs.list_events(job_id, limit=limit).data):
        typer.echo(f"{event.created_at}\t{event.level}\t{event.message}")


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Cancel a job."""
    _print(_client(base_url).fine_tuning.jobs.cancel(job_id))


@jobs_app.command("pause")
def jobs_pause(job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Pause a job at a checkpoint, freeing its worker."""
    _print(_client(base_url).fine_tuning.jobs.pause(job_id))


@jobs_app.command("resume")
def jobs_resume(job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Resume a paused job from its checkpoint."""
    _print(_client(base_url).fine_tuning.jobs.resume(job_id))


@jobs_app.command("checkpoints")
def jobs_checkpoints(job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """List a job's checkpoints, newest first, with their metrics."""
    for checkpoint in _client(base_url).fine_tuning.jobs.checkpoints.list(job_id).data:
        metrics = checkpoint.metrics.model_dump(exclude={"step"}, exclude_none=True)
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        typer.echo(f"{checkpoint.step_number}\t{checkpoint.fine_tuned_model_checkpoint}\t{shown}")


@jobs_app.command("follow")
def jobs_follow(job_id: str, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Follow a job with a live progress bar until it finishes."""
    job = follow(_client(base_url), job_id)
    typer.echo(f"{job.id}: {job.status} {job.fine_tuned_model or ''}")
    raise typer.Exit(0 if job.status == "succeeded" else 1)


@app.command()
def demo(
    data_dir: DataDir = None,
    dataset: Annotated[
        Path | None, typer.Option(help="Folder with train.jsonl and validation.jsonl.")
    ] = None,
    port: int = 8765,
) -> None:
    """The main job: LoRA-tune SmolLM2-135M-Instruct on movie-review sentiment, end to end."""
    from cli.demo import run_demo

    raise typer.Exit(run_demo(_settings(data_dir), dataset=dataset, port=port))
