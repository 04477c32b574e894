"""What API commands print. stdout carries the result alone (with `--json`, exactly the API's JSON document;
otherwise a table), so it can be piped; notes, progress and errors go to stderr."""

import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

Json = Annotated[bool, typer.Option("--json", help="Print the API's JSON on stdout, and nothing else there.")]

err = Console(stderr=True, highlight=False, soft_wrap=True)
_TIMES = {"created", "estimated_finish"}
_UNWRAPPED = 10_000
"""Width of a table written to a pipe: no wrapped or cut ids for `grep` and `cut`."""


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def show(document: Any, as_json: bool, columns: Sequence[str] = ()) -> None:
    """An API object: as JSON, or for people (a list's `data` as a table under `columns`; one object as a
    line a field)."""
    if as_json:
        print_json(document)
    elif isinstance(document, Mapping) and document.get("object") == "list":
        print_table(table(document["data"], columns))
        if document.get("has_more"):
            err.print(f"more: --after {document['last_id']}", markup=False)
    else:
        width = max(map(len, document), default=0)
        for key, value in document.items():
            typer.echo(f"{key:<{width}}  {cell(key, value)}")


def print_table(grid: Table) -> None:
    """A terminal gets the table fitted to its width; a pipe gets it unwrapped, without trailing blanks."""
    console = Console(highlight=False)
    if console.is_terminal:
        console.print(grid)
        return
    console.width = _UNWRAPPED
    with console.capture() as captured:
        console.print(grid)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Table:
    """One row per object; a column may name a nested value (`metrics.train_loss`)."""
    headers = (column.rsplit(".", 1)[-1] for column in columns)
    grid = Table(*headers, box=None, pad_edge=False, header_style="bold")
    for row in rows:
        grid.add_row(*(Text(cell(column, _lookup(row, column))) for column in columns))
    return grid


def cell(key: str, value: Any) -> str:
    """A value as a human reads it: times in UTC, short floats, flat mappings as `k=v`, `-` for nothing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and (key.endswith("_at") or key.rsplit(".", 1)[-1] in _TIMES):
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping) and not any(isinstance(v, Mapping | list) for v in value.values()):
        return " ".join(f"{k}={cell(k, v)}" for k, v in value.items())
    if isinstance(value, Mapping | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _lookup(row: Mapping[str, Any], column: str) -> Any:
    value: Any = row
    for part in column.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value
