"""`ftjobs webhooks`: the organisation's webhook endpoints (URLs that job events are POSTed to, signed) and
what was delivered to them. The routes are OpenAI's `/v1/webhook_endpoints`, called through the client's
generic methods (SDKs before openai 3 have no typed ones)."""

from typing import Annotated

import typer

from cli.client import DEFAULT_BASE_URL, After, BaseUrl, client, given, json_object, once, segment
from cli.output import Json, err, show

app = typer.Typer(help="Webhook endpoints: job events POSTed to your URLs.", no_args_is_help=True)
ENDPOINTS = "/webhook_endpoints"
COLUMNS = ("id", "url", "event_types", "name", "created_at")

Events = Annotated[
    list[str] | None,
    typer.Option("--event", help="An event type (`ftjobs webhooks event-types`); repeatable."),
]
Name = Annotated[str | None, typer.Option(help="A label for people.")]


@app.command()
def create(
    url: str,
    event: Events = None,
    name: Name = None,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Register an endpoint for job events (default: all of them); its signing secret is shown this once."""
    body = given(url=url, event_types=event, name=name)
    show(client(base_url).post(ENDPOINTS, body=body, cast_to=object, options={"headers": once()}), as_json)
    if not as_json:
        err.print("The signing secret is shown this once.")


@app.command("list")
def list_endpoints(
    limit: int = 20, after: After = None, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL
) -> None:
    """List endpoints, newest first."""
    listed = client(base_url).get(
        ENDPOINTS, cast_to=object, options={"params": given(limit=limit, after=after)}
    )
    show(listed, as_json, COLUMNS)


@app.command()
def get(endpoint_id: str, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Show an endpoint (its secret's hint, not the secret)."""
    show(client(base_url).get(_path(endpoint_id), cast_to=object), as_json)


@app.command()
def update(
    endpoint_id: str,
    url: Annotated[str | None, typer.Option(help="A new URL.")] = None,
    event: Events = None,
    name: Name = None,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Change an endpoint's URL, events or name (only what is given)."""
    body = given(url=url, event_types=event, name=name)
    show(client(base_url).post(_path(endpoint_id), body=body, cast_to=object), as_json)


@app.command("rotate-secret")
def rotate_secret(
    endpoint_id: str,
    keep_old: Annotated[bool, typer.Option(help="The old secret signs too for 24 hours.")] = False,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """A new signing secret, shown this once."""
    body = {"keep_old_secret_active_for_24_hours": keep_old}
    path = f"{_path(endpoint_id)}/rotate_secret"
    show(client(base_url).post(path, body=body, cast_to=object, options={"headers": once()}), as_json)


@app.command()
def delete(endpoint_id: str, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Delete an endpoint: nothing more is sent to it."""
    show(client(base_url).delete(_path(endpoint_id), cast_to=object), as_json)


@app.command()
def deliveries(
    endpoint_id: str,
    limit: int = 20,
    after: After = None,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """What was sent to an endpoint, newest first, and how each delivery went."""
    path = f"{_path(endpoint_id)}/deliveries"
    listed = client(base_url).get(path, cast_to=object, options={"params": given(limit=limit, after=after)})
    columns = ("id", "event_type", "fine_tuning_job_id", "status", "attempts", "last_status_code")
    show(listed, as_json, (*columns, "last_attempt_at"))


@app.command("event-types")
def event_types(as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """The events ftjobs sends."""
    listed = json_object(client(base_url).get("/webhook_event_types", cast_to=object))
    if as_json:
        show(listed, as_json)
    else:
        typer.echo("\n".join(listed["data"]))


def _path(endpoint_id: str) -> str:
    return f"{ENDPOINTS}/{segment(endpoint_id)}"
