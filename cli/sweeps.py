"""`ftjobs sweeps`: search a job's hyperparameters with trials that are ordinary jobs (docs/api.md#sweeps);
list and show sweeps, cancel one."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.client import DEFAULT_BASE_URL, After, BaseUrl, client, given, once, segment
from cli.output import Json, show

app = typer.Typer(help="Hyperparameter sweeps (extension).", no_args_is_help=True)
COLUMNS = ("id", "status", "metric", "max_trials", "best.job_id", "best.value", "created_at")


def _object(raw: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise typer.BadParameter(f"not JSON: {error}", param_hint=option) from error
    if not isinstance(value, dict):
        raise typer.BadParameter("expected an object", param_hint=option)
    return value


@app.command()
def create(
    job: Annotated[
        Path, typer.Option(metavar="FILE.json", help="Every trial's job create body, as POST /jobs takes it.")
    ],
    search_space: Annotated[
        str,
        typer.Option(
            metavar="JSON",
            help='Each knob\'s values or range: {"lora_r": [8, 16], "learning_rate_multiplier": '
            '{"low": 0.5, "high": 4, "log": true}}.',
        ),
    ],
    max_trials: Annotated[int, typer.Option(help="Trials (jobs) in all.")],
    metric: Annotated[str | None, typer.Option(help="Default: the jobs' metric_for_best_checkpoint.")] = None,
    parallelism: Annotated[int | None, typer.Option(help="Trials running at once (default 2).")] = None,
    early_stopping: Annotated[
        bool, typer.Option(help="Stop trials whose evaluation curve falls behind (successive halving).")
    ] = True,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Create a sweep: its first trials start at once."""
    try:
        text = job.read_text()
    except OSError as error:
        raise typer.BadParameter(f"cannot read it: {error.strerror}", param_hint="--job") from error
    body = _object(text, "--job") | {
        "search_space": _object(search_space, "--search-space"),
        "max_trials": max_trials,
        "early_stopping": early_stopping,
    }
    body |= given(metric=metric, parallelism=parallelism)
    sweep = client(base_url).post(
        "/fine_tuning/sweeps", body=body, cast_to=object, options={"headers": once()}
    )
    show(sweep, as_json)


@app.command("list")
def list_sweeps(
    limit: int = 20, after: After = None, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL
) -> None:
    """List sweeps, newest first."""
    query = given(limit=limit, after=after or None)
    show(
        client(base_url).get("/fine_tuning/sweeps", cast_to=object, options={"params": query}),
        as_json,
        COLUMNS,
    )


@app.command()
def get(sweep_id: str, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Show a sweep: its trials (job, parameters, status, value) and the best."""
    show(client(base_url).get(f"/fine_tuning/sweeps/{segment(sweep_id)}", cast_to=object), as_json)


@app.command()
def cancel(sweep_id: str, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Cancel a sweep's unfinished trials; finished ones and the best so far stay."""
    path = f"/fine_tuning/sweeps/{segment(sweep_id)}/cancel"
    show(client(base_url).post(path, cast_to=object, options={"headers": once()}), as_json)
