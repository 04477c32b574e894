import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from models.validation import DataError, FileSummary, validate_file

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data"
ROLES = "system, developer, user, assistant, tool"
JSONL = "Expected file to have JSONL format, where every line is a valid JSON dictionary."

USER = {"role": "user", "content": "A moving, funny film."}
ASSISTANT = {"role": "assistant", "content": "positive"}
CHAT = {"messages": [USER, ASSISTANT]}
PROMPT_COMPLETION = {"prompt": "A moving, funny film. Sentiment:", "completion": " positive"}
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "film"}'}}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]

Line = dict[str, Any] | str | bytes


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"messages": list(messages), **extra}


def call(arguments: str = '{"q": "film"}', **changes: Any) -> dict[str, Any]:
    """An assistant message making one tool call."""
    tool_call = {**TOOL_CALL, "function": {"name": "lookup", "arguments": arguments}, **changes}
    return {"role": "assistant", "tool_calls": [tool_call]}


def write(tmp_path: Path, *lines: Line) -> Path:
    """Write one line per item: dicts as JSON, str and bytes verbatim."""
    path = tmp_path / "data.jsonl"
    with path.open("wb") as file:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            file.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


def error_for(path: Path, *, param: str = "training_file", min_examples: int = 1) -> DataError:
    with pytest.raises(DataError) as info:
        validate_file(path, param=param, min_examples=min_examples)
    assert info.value.param == param
    assert str(info.value) == info.value.message
    return info.value


# Each case: the file's lines and fragments the message must contain, including the bad line's number.
FILE_FORMAT_ERRORS: dict[str, tuple[list[Line], list[str]]] = {
    "non_utf8": ([CHAT, b'{"messages": "caf\xe9"}'], ["Line 2 is not valid UTF-8", "0xe9"]),
    "invalid_json": ([CHAT, CHAT, '{"messages": [}'], [f"{JSONL} Line 3 is not valid JSON."]),
    "truncated_json": ([CHAT, '{"messages": ['], ["Line 2 is not valid JSON."]),
    "deeply_nested_json": ([CHAT, "[" * 100_000], ["Line 2 is not valid JSON."]),
    "not_a_dictionary": ([CHAT, "[1, 2]"], [f"{JSONL} Line 2 is not a dictionary."]),
    "string_line": ([CHAT, '"hello"'], ["Line 2 is not a dictionary."]),
    "nan": ([CHAT, '{"messages": [], "x": NaN}'], ["Line 2 is not valid JSON: NaN"]),
    "infinity": (
        [CHAT, CHAT, '{"prompt": "a", "completion": -Infinity}'],
        ["Line 3 is not valid JSON: -Infinity"],
    ),
    "bom_after_first_line": (
        [CHAT, b"\xef\xbb\xbf" + json.dumps(CHAT).encode()],
        ["Line 2 is not valid JSON."],
    ),
    "empty_file": ([], ["no examples"]),
    "blank_lines_only": (["", "   ", "\t"], ["no examples"]),
}

EXAMPLE_ERRORS: dict[str, tuple[list[Line], list[str]]] = {
    "unknown_format": (
        ["", {"text": "A moving film."}],
        ["Line 2 is not a supported example", '"messages"', '"prompt" and "completion"'],
    ),
    "unknown_format_later": ([CHAT, {"text": "x"}], ["Line 2 is not a supported example"]),
    "mixed_chat_then_prompt": (
        ["", CHAT, "", PROMPT_COMPLETION],
        ['Line 4 mixes formats: expected chat examples ("messages") like line 2.'],
    ),
    "mixed_prompt_then_chat": (
        [PROMPT_COMPLETION, CHAT],
        ["Line 2 mixes formats: expected prompt/completion examples", "like line 1"],
    ),
    "messages_and_prompt": ([CHAT, {**CHAT, "prompt": "x"}], ['Line 2 has both "messages" and "prompt"']),
    "unknown_example_key": ([CHAT, {**CHAT, "metadata": {}}], ["Unsupported key `metadata` on line 2"]),
    "messages_not_list": ([CHAT, {"messages": "hi"}], ['"messages" on line 2 must be a non-empty list']),
    "messages_empty": ([CHAT, {"messages": []}], ['"messages" on line 2 must be a non-empty list']),
    "message_not_object": ([CHAT, chat("hi", ASSISTANT)], ["Message 1 on line 2 is not a dictionary."]),
    "missing_role": ([CHAT, chat({"content": "hi"}, ASSISTANT)], ["Message 1 on line 2 has no role."]),
    "bad_role": (
        [CHAT, chat(USER, {"role": "bot", "content": "hi"}, ASSISTANT)],
        [f"Invalid role `bot` in message 2 on line 2. Possible roles: {ROLES}."],
    ),
    "unknown_message_key": (
        [CHAT, CHAT, chat({**USER, "foo": 1}, ASSISTANT)],
        ["Unsupported key `foo` in message 1 on line 3"],
    ),
    "missing_content": ([CHAT, chat(USER, {"role": "assistant"})], ["Message 2 on line 2 has no content."]),
    "null_user_content": (
        [CHAT, chat({"role": "user", "content": None}, ASSISTANT)],
        ["Message 1 on line 2 has no content."],
    ),
    "empty_content": (
        [CHAT, chat({"role": "system", "content": ""}, USER, ASSISTANT)],
        ["Message 1 on line 2 has no content."],
    ),
    "content_not_text": (
        [CHAT, chat({"role": "user", "content": 5}, ASSISTANT)],
        ["Content of message 1 on line 2"],
    ),
    "image_part": (
        [
            CHAT,
            chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, ASSISTANT),
        ],
        ["Content part 1 of message 1 on line 2 is an image; images are not supported."],
    ),
    "text_part_without_text": (
        [
            CHAT,
            chat({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}, ASSISTANT),
        ],
        ["Content part 2 of message 1 on line 2"],
    ),
    "weight_2": (
        [CHAT, chat(USER, {**ASSISTANT, "weight": 2})],
        ["Weight must be either 0 or 1", "message 2 on line 2"],
    ),
    "weight_true": (
        [CHAT, chat(USER, {**ASSISTANT, "weight": True})],
        ["Weight must be either 0 or 1, got true in message 2 on line 2"],
    ),
    "weight_float": (
        [CHAT, chat(USER, {**ASSISTANT, "weight": 0.5})],
        ["Weight must be either 0 or 1, got 0.5"],
    ),
    "weight_on_user": (
        [CHAT, chat({**USER, "weight": 0}, ASSISTANT)],
        ['"weight" is only allowed on assistant messages, but message 1 on line 2 has role `user`.'],
    ),
    "tool_calls_on_user": (
        [CHAT, chat({**USER, "tool_calls": [TOOL_CALL]}, ASSISTANT)],
        ['"tool_calls" is only allowed on assistant messages', "message 1 on line 2"],
    ),
    "tool_call_arguments_not_json": (
        [CHAT, chat(USER, call("{q: film}"), ASSISTANT)],
        ['"function.arguments" of tool call 1 in message 2 on line 2 is not valid JSON.'],
    ),
    "tool_call_arguments_not_string": (
        [
            CHAT,
            chat(
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [{**TOOL_CALL, "function": {"name": "f", "arguments": {}}}],
                },
            ),
        ],
        ['"function.arguments" of tool call 1 in message 2 on line 2 must be a string'],
    ),
    "tool_call_without_id": (
        [CHAT, chat(USER, call(id=""))],
        ['Tool call 1 in message 2 on line 2 must be a dictionary with a string "id".'],
    ),
    "tool_call_wrong_type": (
        [CHAT, chat(USER, call(type="code"))],
        ['must have "type": "function"', "line 2"],
    ),
    "tool_message_unknown_call": (
        [CHAT, chat(USER, call(), {"role": "tool", "tool_call_id": "call_2", "content": "{}"}, ASSISTANT)],
        ["`call_2` of tool message 3 on line 2 does not match any earlier assistant tool call"],
    ),
    "tool_message_before_call": (
        [CHAT, chat(USER, {"role": "tool", "tool_call_id": "call_1", "content": "{}"}, call(), ASSISTANT)],
        ["`call_1` of tool message 2 on line 2 does not match"],
    ),
    "tool_message_without_call_id": (
        [CHAT, chat(USER, call(), {"role": "tool", "content": "{}"}, ASSISTANT)],
        ['Tool message 3 on line 2 needs a string "tool_call_id"'],
    ),
    "bad_tools": (
        [CHAT, chat(USER, ASSISTANT, tools=[{"type": "function"}])],
        ['"tools" on line 2 must be a list'],
    ),
    "no_assistant_message": ([CHAT, chat(USER)], ["Line 2 has no assistant message to train on"]),
    "only_weight_0_assistant": (
        [CHAT, chat(USER, {**ASSISTANT, "weight": 0})],
        ["Line 2 has no assistant message to train on"],
    ),
    "prompt_not_string": (
        [PROMPT_COMPLETION, {"prompt": ["a"], "completion": "b"}],
        ['"prompt" on line 2 must be a string.'],
    ),
    "completion_not_string": (
        [PROMPT_COMPLETION, {"prompt": "a", "completion": 1}],
        ['"completion" on line 2 must be a string.'],
    ),
    "completion_missing": ([PROMPT_COMPLETION, {"prompt": "a"}], ['Line 2 is missing "completion".']),
    "completion_empty": (
        [PROMPT_COMPLETION, {"prompt": "a", "completion": ""}],
        ['"completion" on line 2 is empty.'],
    ),
    "prompt_completion_extra_key": (
        [PROMPT_COMPLETION, {**PROMPT_COMPLETION, "weight": 1}],
        ["Unsupported key `weight` on line 2. Allowed keys: prompt, completion."],
    ),
}


@pytest.mark.parametrize(("lines", "fragments"), FILE_FORMAT_ERRORS.values(), ids=FILE_FORMAT_ERRORS.keys())
def test_invalid_file_format(tmp_path: Path, lines: list[Line], fragments: list[str]) -> None:
    error = error_for(write(tmp_path, *lines))
    assert error.code == "invalid_file_format"
    for fragment in fragments:
        assert fragment in error.message


@pytest.mark.parametrize(("lines", "fragments"), EXAMPLE_ERRORS.values(), ids=EXAMPLE_ERRORS.keys())
def test_invalid_example(tmp_path: Path, lines: list[Line], fragments: list[str]) -> None:
    error = error_for(write(tmp_path, *lines), param="validation_file")
    assert error.code == "invalid_example"
    for fragment in fragments:
        assert fragment in error.message


def test_first_error_wins(tmp_path: Path) -> None:
    path = write(tmp_path, CHAT, chat(USER, {"role": "bot", "content": "x"}), "not json", b"\xff")
    assert error_for(path).message.startswith("Invalid role `bot` in message 2 on line 2.")


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("training_file", "Training file has 3 example(s), but must have at least 10 examples"),
        ("validation_file", "Validation file has 3 example(s), but must have at least 10 examples"),
    ],
)
def test_too_few_examples(tmp_path: Path, param: str, message: str) -> None:
    error = error_for(write(tmp_path, CHAT, "", CHAT, CHAT), param=param, min_examples=10)
    assert error.code == "invalid_n_examples"
    assert error.message == message


def test_enough_examples_at_the_minimum(tmp_path: Path) -> None:
    summary = validate_file(write(tmp_path, *[CHAT] * 10), param="training_file", min_examples=10)
    assert summary == FileSummary(format="chat", n_examples=10)


def test_valid_chat_file(tmp_path: Path) -> None:
    examples = [
        chat({"role": "system", "content": "Classify."}, USER, ASSISTANT),
        chat({"role": "developer", "content": "Be brief."}, USER, ASSISTANT),
        # Multi-turn: only the last answer is trained on.
        chat(
            USER, {**ASSISTANT, "weight": 0}, {"role": "user", "content": "Sure?"}, {**ASSISTANT, "weight": 1}
        ),
        chat(
            {"role": "user", "content": [{"type": "text", "text": "Look it up."}]},
            {**call(), "content": None},
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": '{"sentiment": "positive"}',
                "name": "lookup",
            },
            {"role": "assistant", "content": [{"type": "text", "text": "positive"}], "refusal": None},
            tools=TOOLS,
            parallel_tool_calls=False,
        ),
        # Null optional keys, as exported from the chat completions API.
        chat(USER, {**ASSISTANT, "tool_calls": None, "function_call": None, "refusal": None, "name": None}),
        # Legacy function calling.
        chat(
            USER,
            {"role": "assistant", "function_call": {"name": "lookup", "arguments": "{}"}},
            {"role": "function", "name": "lookup", "content": "positive"},
            ASSISTANT,
            functions=[{"name": "lookup"}],
        ),
    ]
    summary = validate_file(write(tmp_path, *examples), param="training_file", min_examples=6)
    assert summary == FileSummary(format="chat", n_examples=6)


def test_valid_prompt_completion_file(tmp_path: Path) -> None:
    path = write(tmp_path, PROMPT_COMPLETION, {"prompt": "", "completion": "negative"}, PROMPT_COMPLETION)
    summary = validate_file(path, param="validation_file", min_examples=1)
    assert summary == FileSummary(format="prompt_completion", n_examples=3)


def test_blank_lines_bom_and_crlf(tmp_path: Path) -> None:
    line = json.dumps(CHAT).encode()
    path = tmp_path / "windows.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + line + b"\r\n\r\n   \r\n" + line + b"\r\n\t\n" + line
    )  # no final newline
    assert validate_file(path, param="training_file", min_examples=3) == FileSummary("chat", 3)


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    error = error_for(write(tmp_path, "", CHAT, "", "", "[]"))
    assert "Line 5 is not a dictionary." in error.message


def test_unicode_line_separator_inside_a_string_is_not_a_line_break(tmp_path: Path) -> None:
    example = chat({"role": "user", "content": "one\u2028two\x85three"}, ASSISTANT)
    path = write(tmp_path, json.dumps(example, ensure_ascii=False), CHAT)
    assert validate_file(path, param="training_file", min_examples=2).n_examples == 2


def test_streams_large_file_in_bounded_memory(tmp_path: Path) -> None:
    example = chat(
        {"role": "system", "content": "Classify the sentiment of the movie review. " * 3},
        {"role": "user", "content": "An unexpectedly moving film with a strong cast. " * 4},
        {**call(), "content": None},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sentiment": "positive"}'},
        ASSISTANT,
        tools=TOOLS,
    )
    line = (json.dumps(example) + "\n").encode()
    n_lines = 50_000_000 // len(line) + 1
    path = tmp_path / "big.jsonl"
    with path.open("wb") as file:
        for start in range(0, n_lines, 10_000):
            file.write(line * min(10_000, n_lines - start))
    assert path.stat().st_size >= 50_000_000

    tracemalloc.start()
    try:
        summary = validate_file(path, param="training_file", min_examples=10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary == FileSummary(format="chat", n_examples=n_lines)
    assert peak < 5_000_000, f"peak {peak / 1e6:.1f} MB for a {path.stat().st_size / 1e6:.0f} MB file"


@pytest.mark.parametrize(
    ("name", "param", "min_examples", "expected"),
    [("train.jsonl", "training_file", 10, 400), ("validation.jsonl", "validation_file", 1, 100)],
)
def test_shared_sentiment_chat_files(name: str, param: str, min_examples: int, expected: int) -> None:
    path = SHARED_DATA / "sentiment_chat" / name
    summary = validate_file(path, param=param, min_examples=min_examples)
    assert summary == FileSummary(format="chat", n_examples=expected)
