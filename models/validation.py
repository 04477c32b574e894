"""Streaming validation of JSONL fine-tuning files, run by the worker while a job is `validating_files`.

Error codes, the chat format and the preference (DPO) format follow OpenAI's fine-tuning API. Line numbers
are 1-based physical lines (blank lines count); message numbers are 1-based positions in a list of
messages. The file is read one line at a time and lines are capped at MAX_LINE_BYTES, so memory stays
bounded whatever the file holds.
"""

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from graders.template import MISSING, lookup
from models.spec import DataError, DataFormat

MAX_LINE_BYTES = 16 * 2**20
MIN_TRAINING_EXAMPLES = 10
MAX_LABELS = 1_000
"""Most distinct classification labels or NER tags in one file; FileSummary lists them all."""
MAX_LABEL_CHARS = 256
"""Longest label or tag, so the listed labels stay small too."""

_JSONL = "Expected file to have JSONL format, where every line is a valid JSON dictionary."
_FORMATS: dict[DataFormat, str] = {
    "chat": 'chat examples ("messages")',
    "prompt_completion": 'prompt/completion examples ("prompt" and "completion")',
    "text": 'text examples ("text")',
    "classification": 'classification examples ("text" and "label")',
    "token_classification": 'token classification examples ("tokens" and "tags")',
    "preference": 'preference examples ("input", "preferred_output" and "non_preferred_output")',
    "prompts": 'prompts ("messages" ending with the user\'s, and fields for the grader)',
}
# Keys that identify an example's format. "text" alone means text; with "label" it means classification.
_FORMAT_KEYS: dict[DataFormat, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "token_classification": ("tokens", "tags"),
    "preference": (
        "input",
        "preferred_output",
        "non_preferred_output",
        "preferred_completion",
        "non_preferred_completion",
    ),
}
_CHAT_KEYS = ("messages", "tools", "parallel_tool_calls", "functions")
_PROMPT_COMPLETION_KEYS = ("prompt", "completion")
_TEXT_KEYS = ("text",)
_CLASSIFICATION_KEYS = ("text", "label")
_TOKEN_CLASSIFICATION_KEYS = ("tokens", "tags")
_PREFERENCE_INPUT_KEYS = ("messages", "tools", "parallel_tool_calls")
# The two spellings OpenAI accepts for a preference example's outputs.
_OUTPUT_KEYS = ("preferred_output", "non_preferred_output")
_COMPLETION_KEYS = ("preferred_completion", "non_preferred_completion")
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


@dataclass(frozen=True)
class FileSummary:
    format: DataFormat
    n_examples: int
    labels: tuple[str, ...] = ()
    """Distinct classification labels or NER tags, sorted (integer labels numerically); else empty."""


class _InvalidExample(Exception):
    """Raised by the per-example checks; validate_file adds the code and param."""


class _NonFiniteLiteral(Exception):
    """Python's json accepts NaN and Infinity, but they are not JSON and cannot be sent to OpenAI either."""


def _reject_literal(literal: str) -> NoReturn:
    raise _NonFiniteLiteral(literal)


_DECODER = json.JSONDecoder(parse_constant=_reject_literal)


def validate_file(
    path: Path,
    *,
    param: str,
    min_examples: int,
    max_examples: int | None = None,
    require_two_labels: bool = False,
    grader_fields: Sequence[str] | None = None,
) -> FileSummary:
    """Stream-validate a JSONL fine-tuning file; raise DataError on the first problem.

    require_two_labels: a classification file must have at least two distinct labels (for training files).
    grader_fields: a reinforcement job's file, whose every row must have these fields (dotted paths: the
    grader's `{{item.PATH}}` placeholders); its chat examples are prompts.
    """
    file_name = param.replace("_", " ").capitalize()
    file_format: DataFormat | None = None
    first_line = 0
    n_examples = 0
    labels: set[str | int] = set()
    with path.open("rb") as file:
        for line_no, example in _examples(file, param):
            try:
                line_format = _detect_format(example, line_no, prompts=grader_fields is not None)
                if file_format is None:
                    file_format, first_line = line_format, line_no
                elif line_format != file_format:
                    expected = _FORMATS[file_format]
                    raise _InvalidExample(
                        f"Line {line_no} mixes formats: expected {expected} like line {first_line}."
                    )
                if line_format == "prompts":
                    _check_prompt(example, line_no, grader_fields or ())
                else:
                    _check_example(example, line_format, line_no, labels)
            except _InvalidExample as exc:
                raise DataError("invalid_example", str(exc), param) from None
            n_examples += 1
            if max_examples is not None and n_examples > max_examples:
                raise DataError(
                    "invalid_n_examples",
                    f"{file_name} has more than {max_examples} examples, the limit.",
                    param,
                )
    if file_format is None:
        raise DataError(
            "invalid_file_format", "File has no examples: it is empty or has only blank lines.", param
        )
    if n_examples < min_examples:
        raise DataError(
            "invalid_n_examples",
            f"{file_name} has {n_examples} example(s), but must have at least {min_examples} examples",
            param,
        )
    if require_two_labels and file_format == "classification" and len(labels) < 2:
        (label,) = labels
        raise DataError(
            "invalid_example",
            f"{file_name} has only one label (`{_brief(label)}`); a classifier needs at least two.",
            param,
        )
    # A file's labels are all strings or all integers, so they sort; integers sort numerically.
    return FileSummary(
        format=file_format, n_examples=n_examples, labels=tuple(str(label) for label in sorted(labels))
    )


def validate_job_files(
    training: Path,
    validation: Path | None,
    *,
    max_examples: int | None,
    grader_fields: Sequence[str] | None = None,
) -> tuple[FileSummary, FileSummary | None]:
    """A job's files as they must be to train (its runner checks them, the pre-flight estimate too): each on
    its own, then the validation file against the training file, whose model must be able to score it.
    grader_fields: a reinforcement job's (`validate_file`)."""
    train = validate_file(
        training,
        param="training_file",
        min_examples=MIN_TRAINING_EXAMPLES,
        max_examples=max_examples,
        require_two_labels=True,
        grader_fields=grader_fields,
    )
    if validation is None:
        return train, None
    valid = validate_file(
        validation,
        param="validation_file",
        min_examples=1,
        max_examples=max_examples,
        grader_fields=grader_fields,
    )
    if valid.format != train.format:
        raise DataError(
            "invalid_file_format",
            f"The validation file is in {valid.format} format but the training file is in "
            f"{train.format} format.",
            "validation_file",
        )
    if unseen := sorted(set(valid.labels) - set(train.labels)):
        raise DataError(
            "invalid_example",
            f"The validation file has labels the training file does not have: {', '.join(unseen[:10])}; "
            "a classifier can only predict labels it was trained on.",
            "validation_file",
        )
    return train, valid


def peek_format(file: BinaryIO, *, prompts: bool = False) -> DataFormat | None:
    """The format of a file's first example, or None when it has none that parses (a job on the file
    reports exactly why when it validates the whole file). Reads one line. prompts: for a reinforcement
    job, whose chat examples are prompts."""
    try:
        for line_no, example in _examples(file, "training_file"):
            return _detect_format(example, line_no, prompts=prompts)
    except (DataError, _InvalidExample):
        return None
    return None


def first_missing_field(file: BinaryIO, fields: Sequence[str], max_rows: int) -> tuple[int, str] | None:
    """(line number, field) of the first of a file's first max_rows rows that lacks one of the fields (dotted
    paths); None when they all have them, or when the file does not parse (its job says why)."""
    try:
        for row, (line_no, example) in enumerate(_examples(file, "training_file")):
            if row == max_rows:
                break
            for field in fields:
                if lookup(example, field.split(".")) is MISSING:
                    return line_no, field
    except DataError:
        return None
    return None


def _examples(file: BinaryIO, param: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) for each non-blank line."""
    # Binary readline splits on b"\n" only (not on U+2028 and friends) and holds one line at a time.
    lines = iter(lambda: file.readline(MAX_LINE_BYTES + 1), b"")
    for line_no, raw in enumerate(lines, start=1):
        # A read that fills the limit without reaching a newline stopped inside a longer line.
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            message = f"Line {line_no} is longer than {MAX_LINE_BYTES // 2**20} MiB."
            raise DataError("invalid_file_format", message, param)
        example = _parse_line(raw, line_no, param)
        if example is not None:
            yield line_no, example


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
    # JSONDecodeError is a ValueError, as is an integer over Python's 4,300-digit limit;
    # RecursionError: absurdly deep nesting.
    except (ValueError, RecursionError):
        raise DataError("invalid_file_format", f"{_JSONL} Line {line_no} is not valid JSON.", param) from None
    if not isinstance(value, dict):
        raise DataError("invalid_file_format", f"{_JSONL} Line {line_no} is not a dictionary.", param)
    return value


def _detect_format(example: dict[str, Any], line_no: int, *, prompts: bool = False) -> DataFormat:
    if prompts and "messages" in example:
        return "prompts"  # the other keys are the grader's fields, whatever their names
    found: dict[DataFormat, str] = {}  # format -> its first identifying key in the example
    for data_format, keys in _FORMAT_KEYS.items():
        key = next((key for key in keys if key in example), None)
        if key is not None:
            found[data_format] = key
    if len(found) > 1:
        first, second = list(found.values())[:2]
        raise _InvalidExample(
            f'Line {line_no} has both "{first}" and "{second}"; an example has exactly one format.'
        )
    if not found:
        expected = list(_FORMATS.values())
        raise _InvalidExample(
            f"Line {line_no} is not a supported example. Expected {', '.join(expected[:-1])} "
            f"or {expected[-1]}."
        )
    data_format = next(iter(found))
    if data_format == "classification" and "label" not in example:
        return "text"
    return data_format


def _check_example(
    example: dict[str, Any], data_format: DataFormat, line_no: int, labels: set[str | int]
) -> None:
    """Check one example of a known format, adding its labels or tags to the file's."""
    match data_format:
        case "chat":
            _check_chat(example, line_no)
        case "prompt_completion":
            _check_prompt_completion(example, line_no)
        case "text":
            _check_text(example, line_no)
        case "classification":
            _add_label(labels, _check_classification(example, line_no), line_no, "label")
        case "token_classification":
            for tag in _check_token_classification(example, line_no):
                _add_label(labels, tag, line_no, "tag")
        case "preference":
            _check_preference(example, line_no)


def _check_prompt_completion(example: dict[str, Any], line_no: int) -> None:
    _check_keys(example, _PROMPT_COMPLETION_KEYS, f"on line {line_no}")
    for key in _PROMPT_COMPLETION_KEYS:
        if key not in example:
            raise _InvalidExample(f'Line {line_no} is missing "{key}".')
        if not isinstance(example[key], str):
            raise _InvalidExample(f'"{key}" on line {line_no} must be a string.')
    if not example["completion"]:
        raise _InvalidExample(f'"completion" on line {line_no} is empty.')


def _check_text(example: dict[str, Any], line_no: int) -> None:
    _check_keys(example, _TEXT_KEYS, f"on line {line_no}")
    _check_text_field(example, line_no)


def _check_classification(example: dict[str, Any], line_no: int) -> str | int:
    """Check a classification example and return its label."""
    _check_keys(example, _CLASSIFICATION_KEYS, f"on line {line_no}")
    if "text" not in example:
        raise _InvalidExample(f'Line {line_no} is missing "text".')
    _check_text_field(example, line_no)
    label = example["label"]
    # bool is an int subclass, so compare types to reject true/false.
    if not (type(label) is int or (isinstance(label, str) and label)):
        got = _brief(json.dumps(label))  # JSON-encoded so that an empty string shows as ""
        raise _InvalidExample(
            f'"label" on line {line_no} must be a non-empty string or an integer, got {got}.'
        )
    return label


def _check_text_field(example: dict[str, Any], line_no: int) -> None:
    if not isinstance(example["text"], str) or not example["text"]:
        raise _InvalidExample(f'"text" on line {line_no} must be a non-empty string.')


def _check_token_classification(example: dict[str, Any], line_no: int) -> list[str]:
    """Check a token classification (NER) example and return its tags."""
    _check_keys(example, _TOKEN_CLASSIFICATION_KEYS, f"on line {line_no}")
    for key in _TOKEN_CLASSIFICATION_KEYS:
        if key not in example:
            raise _InvalidExample(f'Line {line_no} is missing "{key}".')
        items = example[key]
        if not isinstance(items, list) or not items:
            raise _InvalidExample(f'"{key}" on line {line_no} must be a non-empty list of strings.')
        for index, item in enumerate(items, start=1):
            if not isinstance(item, str):
                raise _InvalidExample(f'Item {index} of "{key}" on line {line_no} is not a string.')
    tokens, tags = example["tokens"], example["tags"]
    if len(tokens) != len(tags):
        raise _InvalidExample(
            f"Line {line_no} has {len(tokens)} tokens but {len(tags)} tags; every token needs one tag."
        )
    return tags


def _add_label(labels: set[str | int], label: str | int, line_no: int, noun: str) -> None:
    """Record a label or tag; the file's labels must be of one type and bounded in number and size."""
    if label in labels:
        return
    earlier = next(iter(labels), label)
    if type(label) is not type(earlier):
        types = {str: "string", int: "integer"}
        raise _InvalidExample(
            f"Line {line_no} has {types[type(label)]} {noun} `{_brief(label)}`, but earlier {noun}s are "
            f"{types[type(earlier)]}s like `{_brief(earlier)}`; {noun}s must be all strings or all integers."
        )
    if isinstance(label, str) and len(label) > MAX_LABEL_CHARS:
        raise _InvalidExample(
            f"The {noun} `{_brief(label)}` on line {line_no} is longer than {MAX_LABEL_CHARS} characters."
        )
    if len(labels) == MAX_LABELS:
        raise _InvalidExample(
            f"Line {line_no} has {noun} `{_brief(label)}`, making more than {MAX_LABELS:,} distinct "
            f"{noun}s; a file may have at most {MAX_LABELS:,}."
        )
    labels.add(label)


def _check_preference(example: dict[str, Any], line_no: int) -> None:
    _check_keys(example, ("input", *_OUTPUT_KEYS, *_COMPLETION_KEYS), f"on line {line_no}")
    output_key = next((key for key in _OUTPUT_KEYS if key in example), None)
    completion_key = next((key for key in _COMPLETION_KEYS if key in example), None)
    if output_key and completion_key:
        raise _InvalidExample(
            f'Line {line_no} has both "{output_key}" and "{completion_key}"; '
            'use either the "_output" or the "_completion" spelling.'
        )
    output_keys = _COMPLETION_KEYS if completion_key else _OUTPUT_KEYS
    for key in ("input", *output_keys):
        if key not in example:
            raise _InvalidExample(f'Line {line_no} is missing "{key}".')

    inputs = example["input"]
    if not isinstance(inputs, dict):
        raise _InvalidExample(f'"input" on line {line_no} must be a dictionary with "messages".')
    _check_keys(inputs, _PREFERENCE_INPUT_KEYS, f'in "input" on line {line_no}')
    messages = inputs.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _InvalidExample(f'"input.messages" on line {line_no} must be a non-empty list of messages.')
    _check_tool_options(inputs, "input.", line_no)
    call_ids: set[str] = set()
    for index, message in enumerate(messages, start=1):
        _check_message(message, f'message {index} of "input" on line {line_no}', call_ids)
    if messages[-1]["role"] == "assistant":
        raise _InvalidExample(
            f'The last message of "input" on line {line_no} is from the assistant; '
            "the input must end where the preferred and non-preferred outputs begin."
        )

    for key in output_keys:
        output = example[key]
        if not isinstance(output, list) or len(output) != 1:
            raise _InvalidExample(
                f'"{key}" on line {line_no} must be a list of exactly one assistant message.'
            )
        message, where = output[0], f'message 1 of "{key}" on line {line_no}'
        # A copy of the input's call ids: each output answers the input on its own.
        _check_message(message, where, set(call_ids))
        if message["role"] != "assistant":
            role = message["role"]
            raise _InvalidExample(f"{_capitalize(where)} has role `{role}`; it must be `assistant`.")
        # Legacy function_call alone passes the chat check, but DPO outputs use tool_calls.
        if not (message.get("content") or message.get("tool_calls")):
            raise _InvalidExample(f"{_capitalize(where)} needs content or tool_calls.")
    if example[output_keys[0]] == example[output_keys[1]]:
        raise _InvalidExample(
            f'"{output_keys[0]}" and "{output_keys[1]}" on line {line_no} are identical; '
            "a preference needs two different answers."
        )


def _check_chat(example: dict[str, Any], line_no: int) -> None:
    _check_keys(example, _CHAT_KEYS, f"on line {line_no}")
    messages = example["messages"]
    if not isinstance(messages, list) or not messages:
        raise _InvalidExample(f'"messages" on line {line_no} must be a non-empty list of messages.')
    _check_tool_options(example, "", line_no)
    functions = example.get("functions", [])
    if not (isinstance(functions, list) and all(_is_function(function) for function in functions)):
        raise _InvalidExample(f'"functions" on line {line_no} must be a list of {{"name": ...}}.')

    call_ids: set[str] = set()  # ids of tool calls made so far, which tool messages must answer
    trained = False
    for index, message in enumerate(messages, start=1):
        _check_message(message, f"message {index} on line {line_no}", call_ids)
        trained = trained or (message["role"] == "assistant" and message.get("weight") != 0)
    if not trained:
        raise _InvalidExample(
            f"Line {line_no} has no assistant message to train on: "
            "at least one assistant message must have weight 1 (or no weight)."
        )


def _check_prompt(example: dict[str, Any], line_no: int, fields: Sequence[str]) -> None:
    """A reinforcement prompt: chat messages ending with the user's; other keys are the grader's, and
    each field its templates name must be there."""
    messages = example["messages"]
    if not isinstance(messages, list) or not messages:
        raise _InvalidExample(f'"messages" on line {line_no} must be a non-empty list of messages.')
    _check_tool_options(example, "", line_no)
    call_ids: set[str] = set()
    for index, message in enumerate(messages, start=1):
        _check_message(message, f"message {index} on line {line_no}", call_ids)
    if messages[-1]["role"] != "user":
        raise _InvalidExample(
            f"The last message on line {line_no} has role `{messages[-1]['role']}`; in a reinforcement file "
            "it must be the user's, which the model answers."
        )
    for field in fields:
        if lookup(example, field.split(".")) is MISSING:
            raise _InvalidExample(
                f"Line {line_no} has no field `{field}`, which the grader names as {{{{item.{field}}}}}."
            )


def _check_tool_options(obj: dict[str, Any], prefix: str, line_no: int) -> None:
    """Check "tools" and "parallel_tool_calls" of a chat example or a preference input."""
    tools = obj.get("tools", [])
    if not (isinstance(tools, list) and all(_is_tool(tool) for tool in tools)):
        raise _InvalidExample(
            f'"{prefix}tools" on line {line_no} must be a list of '
            '{"type": "function", "function": {"name": <string>, ...}}.'
        )
    if not isinstance(obj.get("parallel_tool_calls", False), bool):
        raise _InvalidExample(f'"{prefix}parallel_tool_calls" on line {line_no} must be true or false.')


def _check_message(message: Any, where: str, call_ids: set[str]) -> None:
    """Check one message; `where` names it, e.g. "message 2 on line 7"."""
    if not isinstance(message, dict):
        raise _InvalidExample(f"{_capitalize(where)} is not a dictionary.")
    _check_keys(message, _MESSAGE_KEYS, f"in {where}")
    if "role" not in message:
        raise _InvalidExample(f"{_capitalize(where)} has no role.")
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
            raise _InvalidExample(f"{_capitalize(where)} has no content.")
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
    except (ValueError, _NonFiniteLiteral, RecursionError):  # ValueError as in _parse_line
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


def _capitalize(where: str) -> str:
    return where[:1].upper() + where[1:]


def _brief(value: Any) -> str:
    """Quote a value from the file in a message without echoing something huge back."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
