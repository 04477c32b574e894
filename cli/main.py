"""The `ftjobs` command: run the service, manage base models, and drive the API like the openai client."""

import ipaddress
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from cli import admin, files, jobs, sweeps, webhooks
from cli import inference as inference_commands
from cli import models as api_models
from cli.client import ApiErrors
from models.auth import ApiKeys, InvalidName, Organizations
from models.base_store import register_base
from models.db import session_scope
from models.logs import configure_logging
from models.migrate import open_database
from models.queue import CeleryDispatcher, Dispatcher
from models.registry import InvalidModelName, ModelRegistry
from models.settings import Settings
from models.storage import ArtifactStore, StoreUnavailable, open_store
from worker.child import die_with_parent, visible_devices
from worker.reconciler import Reconciler
from worker.training.quiet import hide_known_library_noise
from worker.webhooks import WebhookSender

app = typer.Typer(
    help="Self-hosted, OpenAI-compatible fine-tuning jobs.", no_args_is_help=True, cls=ApiErrors
)
models_app = typer.Typer(
    help="Base models jobs can fine-tune (pull, add, list: on the server) and the API's models.",
    no_args_is_help=True,
)
keys_app = typer.Typer(
    help="Organisations' API keys (run on the server: it opens the database).", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
# The API's commands (cli/*.py), beside the server's above.
app.add_typer(files.app, name="files")
app.add_typer(jobs.app, name="jobs")
app.add_typer(sweeps.app, name="sweeps")
app.add_typer(webhooks.app, name="webhooks")
app.add_typer(admin.app, name="admin")
api_models.register(models_app)

DataDir = Annotated[Path | None, typer.Option(help="Data directory (default: $FTJOBS_DATA_DIR or ./data).")]
Devices = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=64,
        help="Devices one job may train on (default: $FTJOBS_DEVICES, else the GPUs it sees, 1 on CPU).",
    ),
]

DeviceClass = Annotated[
    str | None,
    typer.Option(
        help="The class of those devices: jobs asking for compute.device_class run only on workers of it "
        "(default: $FTJOBS_DEVICE_CLASS, else the GPUs' name, `cpu` without any).",
    ),
]


def _settings(data_dir: Path | None = None, **overrides: Any) -> Settings:
    """The server's settings. Every server command starts here, so here the process (and every child it
    starts) stops sharing what it creates: the data directory, the SQLite database (webhook secrets),
    artifacts and base models are this user's alone (0700 and 0600), whatever the inherited umask."""
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        settings = Settings(**overrides)
    except ValidationError as error:  # one line per bad setting, naming its variable, not a traceback
        for problem in error.errors():
            variable = "FTJOBS_" + "_".join(str(part) for part in problem["loc"]).upper()
            reason = problem.get("ctx", {}).get("error") or problem["msg"]
            typer.echo(f"Error: {variable}: {reason}", err=True)
        raise typer.Exit(2) from None
    os.umask(0o077)
    return settings


def _check_store(settings: Settings) -> ArtifactStore:
    """A server refuses to start, in one line, when its artifact store cannot be used."""
    try:
        return open_store(settings)
    except StoreUnavailable as error:
        typer.echo(f"error: artifact store: {error}", err=True)
        raise typer.Exit(1) from error


@app.command()
def up(
    host: str = "127.0.0.1",
    port: int = 8000,
    inference_port: Annotated[int, typer.Option(help="The inference server's port (0: any free one).")] = 0,
    data_dir: DataDir = None,
    devices: Devices = None,
    device_class: DeviceClass = None,
) -> None:
    """Run everything on one machine: API + in-process dispatcher, SQLite, local artifacts, and an inference
    server in a child process."""
    import uvicorn

    from api.main import create_app
    from worker.embedded import EmbeddedDispatcher
    from worker.runtime import keep_registered, make_runner

    inference_port = inference_port or _free_port()
    token = secrets.token_urlsafe(32)  # so only this API's requests reach its inference server
    if device_class is not None:
        os.environ["FTJOBS_DEVICE_CLASS"] = device_class
    settings = _settings(data_dir, inference_url=f"http://127.0.0.1:{inference_port}", inference_token=token)
    # The API and the runner share this process: the API refuses jobs asking more than the runner has.
    settings = settings.model_copy(update={"devices": devices or settings.devices or visible_devices()})
    if settings.webhook_allow_private_urls is None:
        # Bound to loopback, only this machine reaches the API: a webhook to a local address reaches nothing
        # its caller couldn't reach anyway, and local receivers are what one machine has.
        settings = settings.model_copy(update={"webhook_allow_private_urls": _is_loopback(host)})
    quiet = settings.log_level or "warning"  # a quiet terminal; FTJOBS_LOG_LEVEL=info shows requests too
    configure_logging(settings, quiet)
    _check_store(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    runner = make_runner(settings)
    keep_registered(runner)
    _announce_admin_key(settings, runner.session_factory)
    dispatcher = EmbeddedDispatcher(runner, runner.session_factory, workers=settings.embedded_workers)
    dispatcher.start()
    sweeps = _sweep_driver(settings, runner.session_factory, runner.store, dispatcher)
    Reconciler(settings, runner.session_factory, dispatcher, runner.store, sweeps).start()
    WebhookSender(settings, runner.session_factory).start()
    # Models load in their own process, so a long generation never stalls the API's event loop.
    inference = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(inference_port), "--log-level", quiet],
        env={**os.environ, "FTJOBS_DATA_DIR": str(settings.data_dir), "FTJOBS_INFERENCE_TOKEN": token},
        preexec_fn=die_with_parent,
    )
    typer.echo(
        f"ftjobs (embedded) on http://{host}:{port}/v1, inference server on {settings.inference_url}, "
        f"data in {settings.data_dir.resolve()}"
    )
    try:
        # Logging is configured above; the app writes its own access lines (with route and request id).
        uvicorn.run(create_app(settings, dispatcher), host=host, port=port, log_config=None, access_log=False)
    finally:
        inference.terminate()
        dispatcher.stop()


@app.command()
def api(host: str = "0.0.0.0", port: int = 8000, workers: int = 1) -> None:
    """Run the API alone (distributed mode): jobs are enqueued to Celery workers."""
    import uvicorn

    from api.metrics import shared_across_processes

    settings = _settings()
    store = _check_store(settings)
    log_config = configure_logging(settings)  # and in each worker process, through uvicorn
    _announce_admin_key(settings, _start_reconciler(settings, store))
    with shared_across_processes(workers):
        uvicorn.run(
            "api.asgi:app", host=host, port=port, workers=workers, log_config=log_config, access_log=False
        )


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8001,
    log_level: str | None = None,
    data_dir: DataDir = None,
    engine: Annotated[
        str | None,
        typer.Option(help="ftjobs or vllm (default FTJOBS_INFERENCE_ENGINE, else ftjobs); vllm needs vLLM."),
    ] = None,
) -> None:
    """Run an inference server (the API forwards to FTJOBS_INFERENCE_URL): each base model loads once,
    fine-tuned adapters attach per request."""
    settings = _settings(data_dir)
    _check_store(settings)  # before loading torch: a refusal comes at once
    hide_known_library_noise()  # before the import below loads bitsandbytes (through peft)
    from inference.app import EngineUnavailable
    from inference.app import serve as serve_models

    settings = _settings(data_dir, **({"inference_engine": engine} if engine else {}))
    _check_store(settings)
    try:
        serve_models(settings, host=host, port=port, log_level=log_level)
    except EngineUnavailable as error:  # one line, not a traceback
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(2) from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@app.command()
def worker(loglevel: str | None = None, devices: Devices = None, device_class: DeviceClass = None) -> None:
    """Run a Celery worker that trains jobs (one at a time, each on up to --devices devices of its
    --device-class); it consumes the queue of jobs for any class and the one of its class."""
    if devices is not None:  # the Celery task builds its runner from the environment
        os.environ["FTJOBS_DEVICES"] = str(devices)
    if device_class is not None:
        os.environ["FTJOBS_DEVICE_CLASS"] = device_class
    from celery.signals import setup_logging

    from models.queue import class_queue
    from worker.runtime import keep_registered
    from worker.tasks import app as celery_app
    from worker.tasks import runner

    settings = _settings()
    store = _check_store(settings)
    configure_logging(settings, loglevel)
    setup_logging.connect(lambda **_: None, weak=False)  # a receiver tells Celery to leave logging alone
    _start_reconciler(settings, store)
    trainer = runner()
    keep_registered(trainer)
    queues = f"{settings.worker_queue},{class_queue(settings.worker_queue, trainer.capacity.device_class)}"
    celery_app.worker_main(["worker", "--pool=solo", f"--queues={queues}"])


@app.command("run-attempt")
def run_attempt(
    job_id: str,
    attempt: int,
    nodes: Annotated[int, typer.Option(min=1, help="Nodes the attempt trains on, each running this.")] = 1,
    node_rank: Annotated[int, typer.Option(min=0, help="This node's number, 0 to NODES-1.")] = 0,
    rendezvous: Annotated[
        str | None, typer.Option(help="HOST:PORT of node 0's rendezvous (with NODES > 1).")
    ] = None,
) -> None:
    """Train one attempt of a job claimed elsewhere, on this node: what `srun` runs on each node of a Slurm
    allocation (FTJOBS_EXECUTOR=slurm). Does nothing when the job no longer runs on that attempt."""
    from worker.child import Placement
    from worker.runtime import make_runner

    if nodes > 1 and rendezvous is None:
        raise typer.BadParameter(
            "give --rendezvous HOST:PORT with --nodes above 1", param_hint="--rendezvous"
        )
    settings = _settings()
    configure_logging(settings)
    placement = (
        Placement(nodes, node_rank, rendezvous, run_id=f"{job_id}-attempt-{attempt}")
        if nodes > 1 and rendezvous is not None
        else None
    )
    make_runner(settings).run_attempt(job_id, attempt, placement)


def _sweep_driver(
    settings: Settings, factory: sessionmaker[Session], store: ArtifactStore, dispatcher: Dispatcher
) -> Callable[[], object]:
    """The reconciler's sweep hook: advance every running sweep, creating trials through the jobs service."""
    from api.sweeps.service import ServiceTrialJobs, drive

    jobs = ServiceTrialJobs(settings, store, dispatcher)
    return lambda: drive(factory, jobs)


def _start_reconciler(settings: Settings, store: ArtifactStore) -> sessionmaker[Session]:
    """Migrate, then sweep for lost jobs (and the store for leftovers) and send webhooks in the background
    (distributed mode: every process does)."""
    factory = open_database(settings)
    dispatcher = CeleryDispatcher(settings)
    sweeps = _sweep_driver(settings, factory, store, dispatcher)
    Reconciler(settings, factory, dispatcher, store, sweeps).start()
    WebhookSender(settings, factory).start()
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
    """Register a base; with object storage it is uploaded too, so every machine's workers can fetch it."""
    store = _check_store(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with session_scope(open_database(settings)) as session:
        try:
            register_base(session, store, name, path, source)
        except InvalidModelName as error:
            raise typer.BadParameter(str(error), param_hint="NAME") from error
        except FileExistsError as error:  # same weights and config, other files (a tokenizer, say)
            message = f"{error}: a base with these weights is stored already"
            raise typer.BadParameter(message, param_hint="PATH") from error
    typer.echo(f"registered {name} -> {path}")


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


inference_commands.register(app)  # chat, complete, classify: after the server's commands in `ftjobs --help`
