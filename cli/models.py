"""The API's models (base models, the organisation's fine-tuned models and checkpoints): list, show, delete
and download them. They join `ftjobs models`, beside the server-side registry commands (pull, add, list)."""

from contextlib import closing
from email.message import Message
from pathlib import Path
from typing import Annotated

import httpx
import typer

from cli.client import DEFAULT_BASE_URL, BaseUrl, client, document, segment
from cli.output import Json, show
from cli.progress import save

STREAMED = {"X-Stainless-Raw-Response": "stream"}
"""What the SDK's `with_streaming_response` sends: the client then hands back the response unread, so a
large archive streams to disk instead of being held in memory (the SDK has no method for this route)."""


def available(as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """List the models the API serves to this key: base models, fine-tuned models and checkpoints."""
    listed = document(client(base_url).models.with_raw_response.list())
    show(listed, as_json, ("id", "kind", "owned_by", "base_model", "created"))


def get(model: str, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Show a model, with its lineage if it is fine-tuned."""
    show(document(client(base_url).models.with_raw_response.retrieve(model)), as_json)


def delete(model: str, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Delete a fine-tuned model or checkpoint and its artifact."""
    show(document(client(base_url).models.with_raw_response.delete(model)), as_json)


def download(
    model: str,
    format: Annotated[
        str, typer.Option(help="adapter (as trained) or merged (into its base; docs/models.md).")
    ] = "adapter",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to write it (- for stdout; default: the server's name)."),
    ] = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Download a model's artifact as .tar.gz (safetensors, tokenizer, lineage.json) with a progress bar;
    the file's path is printed."""
    api = client(base_url)  # held while the body streams: a collected client closes its connections
    response = api.get(
        f"/models/{segment(model)}/content",
        cast_to=httpx.Response,
        options={"params": {"format": format}, "headers": STREAMED},
    )
    with closing(response):
        target = output or Path(_filename(response.headers.get("content-disposition")) or "model.tar.gz")
        save(response, None if str(target) == "-" else target, model)
    if str(target) != "-":
        typer.echo(target)


def register(models_app: typer.Typer) -> None:
    models_app.command("available")(available)
    models_app.command()(get)
    models_app.command()(delete)
    models_app.command()(download)


def _filename(disposition: str | None) -> str | None:
    """The attachment's file name, without any directory a server could slip in."""
    if not disposition:
        return None
    header = Message()
    header["content-disposition"] = disposition
    name = Path(header.get_filename() or "").name
    return name if name not in ("", "..") else None
