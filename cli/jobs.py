"""`ftjobs jobs`: create fine-tuning jobs (or estimate one first with `preflight`), list and show them,
follow one with a progress bar, pause, resume or cancel it, and read its events and checkpoints."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from openai import OpenAI, omit

from cli.client import DEFAULT_BASE_URL, After, BaseUrl, client, document, given, once
from cli.follow import follow
from cli.output import Json, err, print_json, show

app = typer.Typer(help="Fine-tuning jobs.", no_args_is_help=True)
COLUMNS = ("id", "status", "model", "fine_tuned_model", "created_at", "finished_at")
JOB_DID_NOT_SUCCEED = 3
"""Exit code of `jobs follow` when the job failed or was cancelled (1 is an error talking to the API)."""
EXTENSIONS = ("export_merged", "publish")
"""Body fields of ours, which the SDK's typed `create` takes as `extra_body`."""


def _job_command(send: Callable[[OpenAI, dict[str, Any]], Any], doc: str) -> Callable[..., None]:
    """`jobs create` and `jobs preflight`: the same options make the same body, sent to their route."""

    def command(
        model: Annotated[
            str,
            typer.Option(help="A registered base, or a fine-tuned model or checkpoint to tune further."),
        ],
        training_file: Annotated[str, typer.Option(help="A file id (`ftjobs files upload`).")],
        validation_file: Annotated[str | None, typer.Option(help="A file id.")] = None,
        method: Annotated[
            str,
            typer.Option(
                help="supervised, dpo, reward_model or reinforcement (with --grader): with the training "
                "file's format, it picks the objective (docs/api.md)."
            ),
        ] = "supervised",
        grader: Annotated[
            Path | None,
            typer.Option(
                metavar="FILE.json",
                help="A reinforcement job's grader, in OpenAI's JSON shape (docs/api.md, Graders).",
            ),
        ] = None,
        hyperparameter: Annotated[
            list[str] | None,
            typer.Option(
                "--hyperparameter",
                "-p",
                metavar="KEY=VALUE",
                help="A hyperparameter (the value read as JSON when it parses: -p n_epochs=2 -p "
                "training_type=qlora); repeatable, over --hyperparameters.",
            ),
        ] = None,
        hyperparameters: Annotated[
            str | None, typer.Option(metavar="JSON", help='All of them as a JSON object: {"n_epochs": 2}.')
        ] = None,
        suffix: Annotated[str | None, typer.Option(help="Goes into the fine_tuned_model name.")] = None,
        seed: int | None = None,
        metadata: Annotated[list[str] | None, typer.Option(metavar="KEY=VALUE", help="Repeatable.")] = None,
        integrations: Annotated[
            str | None, typer.Option(metavar="JSON", help='A JSON list: [{"type": "wandb", ...}].')
        ] = None,
        export_merged: Annotated[
            bool, typer.Option(help="Also publish the adapter merged into its base (docs/models.md).")
        ] = False,
        publish: Annotated[
            Literal["best", "last"] | None,
            typer.Option(help="Publish the best evaluated checkpoint or the last step (docs/evaluation.md)."),
        ] = None,
        as_json: Json = False,
        base_url: BaseUrl = DEFAULT_BASE_URL,
    ) -> None:
        tuned = _json(hyperparameters, "--hyperparameters", dict) or {}
        tuned |= {key: _value(raw) for key, raw in _pairs(hyperparameter, "--hyperparameter").items()}
        settings: dict[str, Any] = {"hyperparameters": tuned}
        if (method == "reinforcement") != (grader is not None):
            raise typer.BadParameter(
                "goes with --method reinforcement, and it needs one", param_hint="--grader"
            )
        if grader is not None:
            try:
                text = grader.read_text()
            except OSError as error:
                raise typer.BadParameter(
                    f"cannot read it: {error.strerror}", param_hint="--grader"
                ) from error
            settings["grader"] = _json(text, "--grader", dict)
        body: dict[str, Any] = {
            "model": model,
            "training_file": training_file,
            "method": {"type": method, method: settings},
        }
        body |= given(
            validation_file=validation_file,
            suffix=suffix,
            seed=seed,
            metadata=_pairs(metadata, "--metadata") or None,
            integrations=_json(integrations, "--integrations", list),
            export_merged=export_merged or None,
            publish=publish,
        )
        show(send(client(base_url), body), as_json)

    command.__doc__ = doc
    return command


def _create(api: OpenAI, body: dict[str, Any]) -> Any:
    fields = {key: value for key, value in body.items() if key not in EXTENSIONS}
    extensions = {key: body[key] for key in EXTENSIONS if key in body}
    jobs = api.fine_tuning.jobs.with_raw_response
    return document(jobs.create(**fields, extra_body=extensions, extra_headers=once()))


def _preflight(api: OpenAI, body: dict[str, Any]) -> Any:
    return api.post("/fine_tuning/preflight", body=body, cast_to=object)


app.command("create")(_job_command(_create, "Create a fine-tuning job (docs/api.md: the hyperparameters)."))
app.command("preflight")(
    _job_command(_preflight, "Estimate a job before creating it: examples, tokens, memory and duration.")
)


@app.command("list")
def list_jobs(
    limit: int = 20,
    after: After = None,
    metadata: Annotated[
        list[str] | None, typer.Option(metavar="KEY=VALUE", help="Repeatable, ANDed.")
    ] = None,
    status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """List jobs, newest first."""
    raw = client(base_url).fine_tuning.jobs.with_raw_response.list(
        limit=limit,
        after=after or omit,
        metadata=_pairs(metadata, "--metadata") or omit,
        extra_query={"status": status} if status else None,  # our extension
    )
    show(document(raw), as_json, COLUMNS)


@app.command()
def get(job_id: str, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Show a job."""
    show(document(client(base_url).fine_tuning.jobs.with_raw_response.retrieve(job_id)), as_json)


@app.command()
def events(
    job_id: str,
    limit: int = 20,
    after: After = None,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Show a job's newest events (oldest first in the table; as the API lists them with --json)."""
    jobs = client(base_url).fine_tuning.jobs.with_raw_response
    page = document(jobs.list_events(job_id, limit=limit, after=after or omit))
    if not as_json:
        page["data"].reverse()
    show(page, as_json, ("created_at", "level", "type", "message"))


@app.command()
def checkpoints(
    job_id: str,
    limit: int = 10,
    after: After = None,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """List a job's checkpoints, newest first, with their metrics."""
    listed = client(base_url).fine_tuning.jobs.checkpoints.with_raw_response.list(
        job_id, limit=limit, after=after or omit
    )
    metrics = ("metrics.train_loss", "metrics.valid_loss", "metrics.full_valid_loss")
    show(document(listed), as_json, ("step_number", "fine_tuned_model_checkpoint", *metrics))


def _move(action: Literal["cancel", "pause", "resume"], doc: str) -> Callable[..., None]:
    def command(job_id: str, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
        move = getattr(client(base_url).fine_tuning.jobs.with_raw_response, action)
        show(document(move(job_id, extra_headers=once())), as_json)

    command.__doc__ = doc
    return command


app.command("cancel")(_move("cancel", "Cancel a job that has not finished; nothing of it is published."))
app.command("pause")(_move("pause", "Pause a job at a checkpoint, freeing its worker."))
app.command("resume")(_move("resume", "Queue a paused job again; it continues from its checkpoint."))


@app.command("follow")
def follow_job(
    job_id: str,
    poll: Annotated[float, typer.Option(help="Seconds between two polls.")] = 2.0,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Follow a job until it ends: events on stderr, a bar over its steps when stderr is a terminal. Exits
    0 if it succeeded, 3 if it failed or was cancelled."""
    api = client(base_url)
    job = follow(api, job_id, poll_seconds=poll)
    if as_json:
        print_json(document(api.fine_tuning.jobs.with_raw_response.retrieve(job_id)))
    else:
        typer.echo(f"{job.id}: {job.status} {job.fine_tuned_model or ''}".rstrip())
    if job.status != "succeeded":
        if job.error is not None:
            err.print(f"error {job.error.code}: {job.error.message}", markup=False)
        raise typer.Exit(JOB_DID_NOT_SUCCEED)


def _pairs(items: list[str] | None, option: str) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        key, equals, value = item.partition("=")
        if not key or not equals:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        pairs[key] = value
    return pairs


def _value(raw: str) -> Any:
    """`2` → 2, `true` → True, `["q_proj"]` → a list; anything else (`qlora`, `auto`) stays a string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _json(raw: str | None, option: str, kind: type) -> Any:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise typer.BadParameter(f"not JSON: {error}", param_hint=option) from error
    if not isinstance(value, kind):
        expected = "an object" if kind is dict else "a list"
        raise typer.BadParameter(f"expected {expected}", param_hint=option)
    return value
