"""What every API command shares: the official openai client configured from the environment, and API
errors shown as one line on stderr with exit code 1 instead of a traceback."""

import json
import os
import uuid
from contextlib import suppress
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import openai
import typer
from openai import OpenAI
from typer.core import TyperGroup

from cli.output import err

TRANSPORT_ERRORS: tuple[type[Exception], ...] = (httpx.TransportError,)
"""A connection lost while a body streams surfaces as the HTTP library's error, not the SDK's: httpx, or
httpx2 under openai 3."""
with suppress(ImportError):
    import httpx2

    TRANSPORT_ERRORS += (httpx2.TransportError,)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
BaseUrl = Annotated[
    str,
    typer.Option(
        envvar=["FTJOBS_BASE_URL", "OPENAI_BASE_URL"],
        help="The API's base URL (or FTJOBS_BASE_URL, OPENAI_BASE_URL).",
    ),
]
After = Annotated[str | None, typer.Option(help="A page's last id: list the page after it.")]
KEY_VARIABLES = ("FTJOBS_API_KEY", "OPENAI_API_KEY")
ADMIN_KEY_VARIABLES = ("FTJOBS_ADMIN_KEY", *KEY_VARIABLES)
API_ERROR = 1
"""Exit code of a command the API refused or could not be reached for (2 is a usage error)."""


def client(base_url: str, *, admin: bool = False) -> OpenAI:
    """The official client, with the key from the environment (never a flag: argv shows in `ps`)."""
    names = ADMIN_KEY_VARIABLES if admin else KEY_VARIABLES
    key = next((os.environ[name] for name in names if os.environ.get(name)), None)
    if key is None:
        what = "the admin key" if admin else "an organisation's key (`ftjobs keys create --org X` makes one)"
        raise typer.BadParameter(f"set {' or '.join(names)} to {what}")
    return OpenAI(base_url=base_url, api_key=key)


def once() -> dict[str, str]:
    """Headers for a creating request: the SDK resends the same headers when it retries, so a retry after a
    lost response is answered from the API's idempotency store instead of creating a second object."""
    return {"Idempotency-Key": str(uuid.uuid4())}


def segment(value: str) -> str:
    """A user-given id as one URL path segment (for routes the SDK has no method for)."""
    return quote(value, safe="")


def given(**fields: Any) -> dict[str, Any]:
    """The fields that have a value: what the user left out is left out of the request too."""
    return {key: value for key, value in fields.items() if value is not None}


def json_object(answer: object) -> dict[str, Any]:
    """The JSON object a `cast_to=object` call answered with (the SDK types it as any value)."""
    if not isinstance(answer, dict):
        raise TypeError(f"the API answered with a {type(answer).__name__}, not a JSON object")
    return answer


def document(response: Any) -> Any:
    """The API's JSON of a `with_raw_response` call, as sent: `--json` prints exactly this."""
    return json.loads(response.content)


def describe(error: openai.APIStatusError) -> str:
    """`error 404 not_found: No such file: 'file-x' (param: file_id)` from OpenAI's error envelope."""
    body = error.body if isinstance(error.body, dict) else {}
    code = f" {body['code']}" if body.get("code") else ""
    param = f" (param: {body['param']})" if body.get("param") else ""
    return f"error {error.status_code}{code}: {body.get('message') or error.message}{param}"


class ApiErrors(TyperGroup):
    """The root command group: an error from the API, or no answer at all, ends the command with one line
    on stderr and exit code 1, whichever subcommand raised it."""

    # typer runs its groups with typer.Context; the base names the Context of the click that typer bundles.
    def invoke(self, ctx: typer.Context) -> Any:  # pyright: ignore[reportIncompatibleMethodOverride]
        try:
            return super().invoke(ctx)
        except openai.APIStatusError as error:
            err.print(describe(error), markup=False)
        except openai.APIConnectionError as error:
            err.print(f"error: no answer from {error.request.url} ({error.__cause__ or error})", markup=False)
        except TRANSPORT_ERRORS as error:
            err.print(f"error: the connection failed ({type(error).__name__}: {error})", markup=False)
        raise typer.Exit(API_ERROR)
