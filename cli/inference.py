"""`ftjobs chat`, `ftjobs complete` and `ftjobs classify`: ask a base model, a fine-tuned model or a
checkpoint. Text streams to stdout as it is generated; `--json` waits for the whole answer and prints it."""

import sys
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import typer

from cli.client import DEFAULT_BASE_URL, BaseUrl, client, document, given, json_object
from cli.output import Json, print_json, print_table, table

Stream = Annotated[bool, typer.Option(help="Print the text as it is generated.")]
MaxTokens = Annotated[int | None, typer.Option(help="At most this many new tokens.")]
Temperature = Annotated[float | None, typer.Option(help="0 is greedy.")]


def chat(
    model: str,
    message: Annotated[str | None, typer.Argument(help="The user's message (default or -: stdin).")] = None,
    system: Annotated[str | None, typer.Option(help="A system message before it.")] = None,
    max_tokens: MaxTokens = None,
    temperature: Temperature = None,
    stream: Stream = True,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Chat with a model: one user message (and an optional system message), one answer."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": _text(message, "MESSAGE")})
    request = {"model": model, "messages": messages, **given(max_tokens=max_tokens, temperature=temperature)}
    _answer(client(base_url).chat.completions, request, stream, as_json, _chat_text)


def complete(
    model: str,
    prompt: Annotated[str | None, typer.Argument(help="The prompt (default or -: stdin).")] = None,
    max_tokens: MaxTokens = None,
    temperature: Temperature = None,
    stream: Stream = True,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Continue a prompt (OpenAI's legacy completions)."""
    request = {"model": model, "prompt": _text(prompt, "PROMPT")}
    request |= given(max_tokens=max_tokens, temperature=temperature)
    _answer(client(base_url).completions, request, stream, as_json, lambda choice: choice.get("text") or "")


def classify(
    model: str,
    texts: Annotated[
        list[str] | None, typer.Argument(help="Texts to label (default: stdin, a line each).")
    ] = None,
    as_json: Json = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
) -> None:
    """Label texts with a fine-tuned classifier: each text's best label and its probability."""
    inputs = texts or [line for line in _text(None, "TEXTS").splitlines() if line.strip()]
    body = {"model": model, "input": inputs}
    answer = json_object(client(base_url).post("/classifications", body=body, cast_to=object))
    if as_json:
        print_json(answer)
        return
    rows = [{**row, "input": inputs[row["index"]]} for row in answer["data"]]
    print_table(table(rows, ("label", "score", "input")))


def register(app: typer.Typer) -> None:
    for command in (chat, complete, classify):
        app.command()(command)


Text = Callable[[Mapping[str, Any]], str]
"""The text of one choice: of a streamed chunk or of a whole answer."""


def _answer(resource: Any, request: dict[str, Any], stream: bool, as_json: bool, text: Text) -> None:
    """Stream the first choice's text to stdout, or print the whole answer (its JSON with --json)."""
    if stream and not as_json:
        for chunk in resource.create(**request, stream=True):
            choices = chunk.to_dict().get("choices")
            if choices:  # the last chunk may carry only usage
                sys.stdout.write(text(choices[0]))
                sys.stdout.flush()
        sys.stdout.write("\n")
        return
    answer = document(resource.with_raw_response.create(**request))
    if as_json:
        print_json(answer)
    else:
        typer.echo(text(answer["choices"][0]))


def _chat_text(choice: Mapping[str, Any]) -> str:
    """A chunk's `delta`, or a whole answer's `message`."""
    return str((choice.get("delta") or choice.get("message") or {}).get("content") or "")


def _text(given: str | None, name: str) -> str:
    if given is not None and given != "-":
        return given
    if sys.stdin.isatty():
        typer.echo(f"Reading {name} from stdin; end it with Ctrl-D.", err=True)
    text = sys.stdin.read()
    if not text.strip():
        raise typer.BadParameter(f"give {name} or pipe it on stdin", param_hint=name)
    return text
