"""`ftjobs admin`: organisations, their storage quotas and their API keys over the API, with the admin key
(FTJOBS_ADMIN_KEY). `ftjobs keys` does the same for keys on the server machine, straight in the database."""

from typing import Annotated, Any

import typer

from cli.client import DEFAULT_BASE_URL, BaseUrl, client, json_object, segment
from cli.output import Json, err, show

app = typer.Typer(
    help="Organisations, storage quotas and API keys, over the API with the admin key.", no_args_is_help=True
)
orgs_app = typer.Typer(
    help="Organisations, their storage quotas and scheduling policies.", no_args_is_help=True
)
keys_app = typer.Typer(help="Organisations' API keys.", no_args_is_help=True)
app.add_typer(orgs_app, name="orgs")
app.add_typer(keys_app, name="keys")

Org = Annotated[str, typer.Argument(metavar="ORG", help="The organisation's id or name.")]
KEY_COLUMNS = ("id", "name", "redacted_value", "created_at", "last_used_at", "revoked_at")
ORG_COLUMNS = ("id", "name", "storage_used_bytes", "storage_limit_bytes", "created_at")


@orgs_app.command("create")
def create_org(name: str, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Make an organisation (a-z, 0-9, - and _)."""
    body = {"name": name}
    show(client(base_url, admin=True).post("/admin/organizations", body=body, cast_to=object), as_json)


@orgs_app.command("list")
def list_orgs(as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """List organisations, with the bytes each stores and its limit (0: none)."""
    show(_organizations(base_url), as_json, ORG_COLUMNS)


@orgs_app.command("get")
def get_org(org: Org, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Show an organisation, with its storage use and limit."""
    path = f"/admin/organizations/{segment(_org_id(org, base_url))}"
    show(client(base_url, admin=True).get(path, cast_to=object), as_json)


@orgs_app.command("set-quota")
def set_quota(
    org: Org,
    quota: Annotated[str, typer.Argument(metavar="BYTES", help="0: no limit; 'default': the server's.")],
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Set how many bytes an organisation's files, fine-tuned models and checkpoints may hold."""
    if quota != "default" and not quota.isdigit():
        raise typer.BadParameter("a number of bytes, or 'default'", param_hint="BYTES")
    body = {"storage_quota_bytes": None if quota == "default" else int(quota)}
    path = f"/admin/organizations/{segment(_org_id(org, base_url))}"
    show(client(base_url, admin=True).post(path, body=body, cast_to=object), as_json)


@orgs_app.command("set-policy")
def set_policy(
    org: Org,
    weight: Annotated[float | None, typer.Option(help="Fair-share weight (> 0; default 1).")] = None,
    cap: Annotated[
        list[str] | None,
        typer.Option(
            help="CLASS=N: most devices of CLASS its running jobs may hold (`*=N`: any class); "
            "repeatable; `--cap none` removes every cap."
        ),
    ] = None,
    budget: Annotated[
        str | None, typer.Option(help="Device-hours per calendar month (UTC); `none` removes the budget.")
    ] = None,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Set an organisation's scheduling policy; options not given stay as they are (docs/scheduling.md)."""
    body: dict[str, Any] = {}
    if weight is not None:
        body["share_weight"] = weight
    if cap is not None:
        body["device_caps"] = None if cap == ["none"] else _caps(cap)
    if budget is not None:
        body["monthly_device_hours"] = None if budget == "none" else _hours(budget)
    if not body:
        raise typer.BadParameter("give --weight, --cap or --budget", param_hint="options")
    path = f"/admin/organizations/{segment(_org_id(org, base_url))}"
    show(client(base_url, admin=True).post(path, body=body, cast_to=object), as_json)


def _caps(items: list[str]) -> dict[str, int]:
    caps = {}
    for item in items:
        device_class, _, number = item.partition("=")
        if not device_class or not number.isdigit():
            raise typer.BadParameter(f"{item!r} is not CLASS=N", param_hint="--cap")
        caps[device_class] = int(number)
    return caps


def _hours(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number of hours", param_hint="--budget") from None


@keys_app.command("create")
def create_key(
    org: Org,
    name: Annotated[str, typer.Option(help="What the key is for.")] = "",
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Make a key and print it, alone on stdout (`KEY=$(ftjobs admin keys create acme)`); it is shown
    this once."""
    path = f"/admin/organizations/{segment(_org_id(org, base_url))}/api_keys"
    created = json_object(client(base_url, admin=True).post(path, body={"name": name}, cast_to=object))
    if as_json:
        show(created, as_json)
        return
    note = f"created key {created['id']} ({created['redacted_value']}); it is not shown again"
    err.print(note, markup=False)
    typer.echo(created["value"])


@keys_app.command("list")
def list_keys(org: Org, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """List an organisation's keys (never their values)."""
    path = f"/admin/organizations/{segment(_org_id(org, base_url))}/api_keys"
    show(client(base_url, admin=True).get(path, cast_to=object), as_json, KEY_COLUMNS)


@keys_app.command("revoke")
def revoke_key(key_id: str, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Revoke a key: its next request gets a 401."""
    path = f"/admin/api_keys/{segment(key_id)}"
    show(client(base_url, admin=True).delete(path, cast_to=object), as_json)


def _organizations(base_url: str) -> Any:
    return client(base_url, admin=True).get("/admin/organizations", cast_to=object)


def _org_id(org: str, base_url: str) -> str:
    """An organisation's id from its id or its name (an unknown one is left for the API to refuse)."""
    by_name = {item["name"]: item["id"] for item in _organizations(base_url)["data"]}
    return by_name.get(org, org)
