"""`ftjobs files`: upload, list, show, download and delete files through the API."""

from pathlib import Path
from typing import Annotated

import typer
from openai import omit

from cli.client import DEFAULT_BASE_URL, After, BaseUrl, client, document, once
from cli.output import Json, show
from cli.progress import reading, save

app = typer.Typer(help="Files: training data and jobs' results.", no_args_is_help=True)
COLUMNS = ("id", "purpose", "bytes", "filename", "created_at", "status")


@app.command()
def upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    purpose: str = "fine-tune",
    expires_after: Annotated[
        int | None, typer.Option(help="Seconds (3600 to 2592000) after which the file is gone.")
    ] = None,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Upload a JSONL file (streamed, with a progress bar)."""
    expiry = {"anchor": "created_at", "seconds": expires_after} if expires_after else omit
    with reading(path) as source:
        raw = client(base_url).files.with_raw_response.create(
            file=source,
            purpose=purpose,  # pyright: ignore[reportArgumentType]  # the API validates it
            expires_after=expiry,  # pyright: ignore[reportArgumentType]  # the API validates it
            extra_headers=once(),
        )
    show(document(raw), as_json)


@app.command("list")
def list_files(
    purpose: Annotated[str | None, typer.Option(help="fine-tune or fine-tune-results.")] = None,
    limit: int = 100,
    after: After = None,
    order: Annotated[str, typer.Option(help="asc or desc (by creation time).")] = "desc",
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """List files, newest first."""
    raw = client(base_url).files.with_raw_response.list(
        purpose=purpose or omit,
        limit=limit,
        after=after or omit,
        order=order,  # pyright: ignore[reportArgumentType]  # the API validates it
    )
    show(document(raw), as_json, COLUMNS)


@app.command()
def get(file_id: str, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Show a file's metadata."""
    show(document(client(base_url).files.with_raw_response.retrieve(file_id)), as_json)


@app.command()
def content(
    file_id: str,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here, not to stdout.")] = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Download a file's bytes (a job's results CSV, say) to stdout or, with -o, to a file whose path is
    printed."""
    with client(base_url).files.with_streaming_response.content(file_id) as response:
        save(response, output, file_id)
    if output is not None:
        typer.echo(output)


@app.command()
def delete(file_id: str, as_json: Json = False, base_url: BaseUrl = DEFAULT_BASE_URL) -> None:
    """Delete a file (not one an unfinished job still reads)."""
    show(document(client(base_url).files.with_raw_response.delete(file_id)), as_json)
