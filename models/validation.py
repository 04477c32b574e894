"""Streaming validation of JSONL fine-tuning files, run by the worker while a job is `validating_files`.

Error codes and the chat format follow OpenAI's fine-tuning API. Line numbers are 1-based physical lines
(blank lines count); message numbers are 1-based positions in an example's `messages`. The file is read
one line at a time, so memory stays bounded by the longest line, not the file size.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from models.spec import DataFormat

_JSONL = "Expected file to have JSONL format, where every line is a valid JSON dictionary."
_FORMATS: dict[DataFormat, str] = {
    "chat": 'chat examples ("messages")',
    "prompt_completion": 'prompt/completion examples ("prompt" and "completion")',
}
_CHAT_KEYS = ("messages", "tools", "parallel_tool_calls", "functions")
_PROMPT_COMPLETION_KEYS = ("prompt", "completion")
_ROLES = ("system", "developer", "user", "assistant", "tool")
_LEGACY_ROLES = ("function",)  # accepted for old files, not advertised in messages
_MESSAGE_KEYS = (
    "role",
    "content",
    "name",
    "weight",
    "tool_calls",
    "tool_call_id",
    "function_call",
    "refusal",
)
# Message keys that only make sense for one role.
_ROLE_ONLY_KEYS = {
    "weight": "assistant",
    "tool_calls": "assistant",
    "function_call": "assistant",
    "refusal": "assistant",
    "tool_call_id": "tool",
}


class DataError(Exception):
    """A file that cannot be trained on."""

    def __init__(self, code: str, message: str, param: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


@dataclass(frozen=True)
class FileSummary:
    format: DataFormat
    n_examples: int


class _InvalidExample(Exception):
    """Raised by the per-example checks; validate_file adds the code and param."""


class _NonFiniteLiteral(Exception):
    """Python's json accepts NaN and Infinity, but they are not JSON and cannot be sent to OpenAI either."""


def _reject_literal(literal: str) -> NoReturn:
    raise _NonFiniteLiteral(literal)


_DECODER = json.JSONDecoder(parse_constant=_reject_literal)


def validate_file(path: Path, *, param: str, min_examples: int) -> FileSummary:
    """Stream-validate a JSONL fine-tuning file; raise DataError on the first problem."""
    file_format: DataFormat | None = None
    first_line = 0
    n_examples = 0
    # Binary iteration splits on b"\n" only (not on U+2028 and friends) and holds one line at a time.
    with path.open("rb") as file:
        for line_no, raw in enumerate(file, start=1):
            example = _parse_line(raw, line_no, param)
            if example is None:
                continue
            try:
                line_format = _detect_format(example, line_no)
                if file_format is None:
                    file_format, first_line = line_format, line_no
                elif line_format != file_format:
                    expected = _FORMATS[file_format]
                    raise _InvalidExample(
                        f"Line {line_no} mixes formats: expected {expected} like line {first_line}."
                    )
                if line_format == "chat":
                    _check_chat(example, line_no)
                else:
                    _check_prompt_completion(example, line_no)
            except _InvalidExample as exc:
                raise DataError("invalid_example", str(exc), param) from None
            n_examples += 1
    if file_format is None:
        raise DataError(
            "invalid_file_format", "File has no examples: it is empty or has only blank lines.", param
        )
    if n_examples < min_examples:
        label = param.replace("_", " ").capitalize()
        raise DataError(
            "invalid_n_examples",
            f"{label} has {n_examples} example(s), but must have at least {min_examples} examples",
            param,
        )
    return FileSummary(format=file_format, n_examples=n_examples)


def _parse_line(raw: bytes, line_no: int, param: str) -> dict[str, Any] | None:
    """Decode one line into a JSON object, or None for a blank line."""
    if line_no == 1:
        raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 BOM, as written by some Windows editors
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_byte = raw[exc.start]
        message = (
            f"Expected file to be UTF-8 encoded. Line {line_no} is not valid UTF-8 (byte 0x{bad_byte:02x})."
        )
        raise DataError("invalid_file_format", message, param) from None
    if not text.strip(" \t\r\n"):  # JSON whitespace only, so we skip exactly what the parser would
        return None
    try:
        value = _DECODER.decode(text)
    except _NonFiniteLiteral as exc:
        message = f"{_JSONL} Line {line_no} is not valid JSON: {exc} is not a JSON value."
        raise DataError("invalid_file_format", message, param) from None
    except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise DataError("invalid_file_format", f"{_JSONL} Line {line_no} is not valid JSON.", param) from None
    if not isinstance(value, dict):
        raise DataError("invalid_file_format", f"{_JSONL} Line {line_no} is not a dictionary.", param)
    return value


def _detect_format(example: dict[str, Any], line_no: int) -> DataFormat:
    has_messages = "messages" in example
    has_prompt_completion = any(key in example for key in _PROMPT_COMPLETION_KEYS)
    if has_messages and has_prompt_completion:
        raise _InvalidExample(
            f'Line {line_no} has both "messages" and "prompt"/"completion"; '
            "an example is either chat or prompt/completion."
        )
    if has_messages:
        return "chat"
    if has_prompt_completion:
        return "prompt_completion"
    raise _InvalidExample(
        f"Line {line_no} is not a supported example. Expected {_FORMATS['chat']} "
        f"or {_FORMATS['prompt_completion']}."
    )


def _check_prompt_completion(example: dict[str, Any], line_no: int) -> None:
    _check_keys(example, _PROMPT_COMPLETION_KEYS, f"on line {line_no}")
    for key in _PROMPT_COMPLETION_KEYS:
        if key not in example:
            raise _InvalidExample(f'Line {line_no} is missing "{key}".')
        if not isinstance(example[key], str):
            raise _InvalidExample(f'"{key}" on line {line_no} must be a string.')
    if not example["completion"]:
        raise _InvalidExample(f'"completion" on line {line_no} is empty.')


def _check_chat(example: dict[str, Any], line_no: int) -> None:
    _check_keys(example, _CHAT_KEYS, f"on line {line_no}")
    messages = example["messages"]
    if not isinstance(messages, list) or not messages:
        raise _InvalidExample(f'"messages" on line {line_no} must be a non-empty list of messages.')
    tools = example.get("tools", [])
    if not (isinstance(tools, list) and all(_is_tool(tool) for tool in tools)):
        raise _InvalidExample(
            f'"tools" on line {line_no} must be a list of '
            '{"type": "function", "function": {"name": <string>, ...}}.'
        )
    functions = example.get("functions", [])
    if not (isinstance(functions, list) and all(_is_function(function) for function in functions)):
        raise _InvalidExample(f'"functions" on line {line_no} must be a list of {{"name": ...}}.')
    if not isinstance(example.get("parallel_tool_calls", False), bool):
        raise _InvalidExample(f'"parallel_tool_calls" on line {line_no} must be true or false.')

    call_ids: set[str] = set()  # ids of tool calls made so far, which tool messages must answer
    trained = False
    for index, message in enumerate(messages, start=1):
        _check_message(message, index, line_no, call_ids)
        trained = trained or (message["role"] == "assistant" and message.get("weight") != 0)
    if not trained:
        raise _InvalidExample(
            f"Line {line_no} has no assistant message to train on: "
            "at least one assistant message must have weight 1 (or no weight)."
        )


def _check_message(message: Any, index: int, line_no: int, call_ids: set[str]) -> None:
    where = f"message {index} on line {line_no}"
    if not isinstance(message, dict):
        raise _InvalidExample(f"Message {index} on line {line_no} is not a dictionary.")
    _check_keys(message, _MESSAGE_KEYS, f"in {where}")
    if "role" not in message:
        raise _InvalidExample(f"Message {index} on line {line_no} has no role.")
    role = message["role"]
    if role not in _ROLES + _LEGACY_ROLES:
        raise _InvalidExample(
            f"Invalid role `{_brief(role)}` in {where}. Possible roles: {', '.join(_ROLES)}."
        )
    # Optional keys may be null, as in messages exported from the chat completions API.
    for key, only_role in _ROLE_ONLY_KEYS.items():
        if message.get(key) is not None and role != only_role:
            raise _InvalidExample(
                f'"{key}" is only allowed on {only_role} messages, but {where} has role `{role}`.'
            )

    # bool is an int subclass, so compare types to reject true/false.
    weight = message.get("weight")
    if weight is not None and not (type(weight) is int and weight in (0, 1)):
        raise _InvalidExample(f"Weight must be either 0 or 1, got {_brief(weight)} in {where}.")
    if not isinstance(message.get("name"), str | None):
        raise _InvalidExample(f'"name" in {where} must be a string.')
    if not isinstance(message.get("refusal"), str | None):
        raise _InvalidExample(f'"refusal" in {where} must be a string.')

    content = message.get("content")
    if content is None or content == "" or content == []:
        # An assistant turn that only calls a tool has nothing else to say.
        if not (role == "assistant" and (message.get("tool_calls") or message.get("function_call"))):
            raise _InvalidExample(f"Message {index} on line {line_no} has no content.")
    else:
        _check_content(content, where)

    if message.get("tool_calls") is not None:
        _check_tool_calls(message["tool_calls"], where, call_ids)
    if message.get("function_call") is not None:
        _check_arguments(message["function_call"], "function_call", where)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise _InvalidExample(f'Tool {where} needs a string "tool_call_id" naming an earlier tool call.')
        if call_id not in call_ids:
            raise _InvalidExample(
                f'"tool_call_id" `{_brief(call_id)}` of tool {where} does not match '
                "any earlier assistant tool call in the example."
            )


def _check_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _InvalidExample(f"Content of {where} must be a string or a list of content parts.")
    for index, part in enumerate(content, start=1):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            raise _InvalidExample(f"Content part {index} of {where} is an image; images are not supported.")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise _InvalidExample(
                f'Content part {index} of {where} must be {{"type": "text", "text": <string>}}; '
                "only text parts are supported."
            )


def _check_tool_calls(calls: Any, where: str, call_ids: set[str]) -> None:
    if not isinstance(calls, list) or not calls:
        raise _InvalidExample(f'"tool_calls" in {where} must be a non-empty list.')
    for index, call in enumerate(calls, start=1):
        call_where = f"tool call {index} in {where}"
        if not isinstance(call, dict) or not isinstance(call.get("id"), str) or not call["id"]:
            raise _InvalidExample(f'Tool call {index} in {where} must be a dictionary with a string "id".')
        if call.get("type") != "function":
            raise _InvalidExample(f'Tool call {index} in {where} must have "type": "function".')
        _check_arguments(call.get("function"), "function", call_where)
        call_ids.add(call["id"])


def _check_arguments(function: Any, field: str, where: str) -> None:
    """Check a called function: a name, and arguments JSON-encoded in a string as the API sends them."""
    if not _is_function(function):
        raise _InvalidExample(f'"{field}" of {where} must be a dictionary with a string "name".')
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        raise _InvalidExample(f'"{field}.arguments" of {where} must be a string of JSON.')
    try:
        _DECODER.decode(arguments)
    except (json.JSONDecodeError, _NonFiniteLiteral, RecursionError):
        raise _InvalidExample(f'"{field}.arguments" of {where} is not valid JSON.') from None


def _is_tool(tool: Any) -> bool:
    return isinstance(tool, dict) and tool.get("type") == "function" and _is_function(tool.get("function"))


def _is_function(function: Any) -> bool:
    return isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"] != ""


def _check_keys(obj: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise _InvalidExample(
                f"Unsupported key `{_brief(key)}` {where}. Allowed keys: {', '.join(allowed)}."
            )


def _brief(value: Any) -> str:
    """Quote a value from the file in a message without echoing something huge back."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
