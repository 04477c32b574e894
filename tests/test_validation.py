import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from models.validation import MAX_LINE_BYTES, DataError, FileSummary, validate_file

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data"
ROLES = "system, developer, user, assistant, tool"
JSONL = "Expected file to have JSONL format, where every line is a valid JSON dictionary."

USER = {"role": "user", "content": "A moving, funny film."}
ASSISTANT = {"role": "assistant", "content": "positive"}
CHAT = {"messages": [USER, ASSISTANT]}
PROMPT_COMPLETION = {"prompt": "A moving, funny film. Sentiment:", "completion": " positive"}
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "film"}'}}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
TEXT = {"text": "A moving, funny film."}
CLASSIFICATION = {"text": "A moving, funny film.", "label": "positive"}
NER = {"tokens": ["Diane", "Lane", "shines", "."], "tags": ["B-PER", "I-PER", "O", "O"]}
NEGATIVE = {"role": "assistant", "content": "negative"}
PREFERENCE = {
    "input": {"messages": [USER]},
    "preferred_output": [ASSISTANT],
    "non_preferred_output": [NEGATIVE],
}
FORMAT_DESCRIPTIONS = [
    'chat examples ("messages")',
    'prompt/completion examples ("prompt" and "completion")',
    'text examples ("text")',
    'classification examples ("text" and "label")',
    'token classification examples ("tokens" and "tags")',
    'preference examples ("input", "preferred_output" and "non_preferred_output")',
]

Line = dict[str, Any] | str | bytes


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"messages": list(messages), **extra}


def call(arguments: str = '{"q": "film"}', **changes: Any) -> dict[str, Any]:
    """An assistant message making one tool call."""
    tool_call = {**TOOL_CALL, "function": {"name": "lookup", "arguments": arguments}, **changes}
    return {"role": "assistant", "tool_calls": [tool_call]}


def preference(*messages: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A preference example whose input is `messages` (default: one user message)."""
    return {**PREFERENCE, "input": {"messages": list(messages or [USER])}, **changes}


def text_line(n_bytes: int) -> bytes:
    """A valid text example exactly n_bytes long."""
    return b'{"text": "' + b"a" * (n_bytes - 12) + b'"}'


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
    "integer_over_4300_digits": (
        [CLASSIFICATION, '{"text": "a", "label": ' + "1" * 5000 + "}"],
        [f"{JSONL} Line 2 is not valid JSON."],
    ),
    "empty_file": ([], ["no examples"]),
    "blank_lines_only": (["", "   ", "\t"], ["no examples"]),
}

EXAMPLE_ERRORS: dict[str, tuple[list[Line], list[str]]] = {
    "unknown_format": (
        ["", {"review": "A moving film."}],
        ["Line 2 is not a supported example. Expected chat examples", *FORMAT_DESCRIPTIONS],
    ),
    "unknown_format_later": ([CHAT, {"review": "x"}], ["Line 2 is not a supported example"]),
    "empty_object": ([TEXT, {}], ["Line 2 is not a supported example"]),
    "mixed_chat_then_prompt": (
        ["", CHAT, "", PROMPT_COMPLETION],
        ['Line 4 mixes formats: expected chat examples ("messages") like line 2.'],
    ),
    "mixed_prompt_then_chat": (
        [PROMPT_COMPLETION, CHAT],
        ["Line 2 mixes formats: expected prompt/completion examples", "like line 1"],
    ),
    "messages_and_prompt": (
        [CHAT, {**CHAT, "prompt": "x"}],
        ['Line 2 has both "messages" and "prompt"; an example has exactly one format.'],
    ),
    "mixed_chat_then_text": (
        [CHAT, TEXT],
        ['Line 2 mixes formats: expected chat examples ("messages") like line 1.'],
    ),
    "mixed_text_then_classification": (
        [TEXT, "", CLASSIFICATION],
        ['Line 3 mixes formats: expected text examples ("text") like line 1.'],
    ),
    "mixed_classification_then_text": (
        [CLASSIFICATION, TEXT],
        ['Line 2 mixes formats: expected classification examples ("text" and "label") like line 1.'],
    ),
    "mixed_classification_then_ner": (
        [CLASSIFICATION, NER],
        ["Line 2 mixes formats: expected classification examples", "like line 1"],
    ),
    "mixed_ner_then_preference": (
        [NER, NER, PREFERENCE],
        ['Line 3 mixes formats: expected token classification examples ("tokens" and "tags") like line 1.'],
    ),
    "mixed_preference_then_chat": (
        [PREFERENCE, CHAT],
        ["Line 2 mixes formats: expected preference examples", "like line 1"],
    ),
    "text_and_tokens": ([NER, {**NER, "text": "x"}], ['Line 2 has both "text" and "tokens"']),
    "messages_and_input": ([CHAT, {**PREFERENCE, **CHAT}], ['Line 2 has both "messages" and "input"']),
    # text
    "text_empty": ([TEXT, {"text": ""}], ['"text" on line 2 must be a non-empty string.']),
    "text_not_string": ([TEXT, {"text": ["a"]}], ['"text" on line 2 must be a non-empty string.']),
    "text_extra_key": (
        [TEXT, {**TEXT, "source": "imdb"}],
        ["Unsupported key `source` on line 2. Allowed keys: text."],
    ),
    # classification
    "classification_text_empty": (
        [CLASSIFICATION, {"text": "", "label": "positive"}],
        ['"text" on line 2 must be a non-empty string.'],
    ),
    "classification_text_missing": ([CLASSIFICATION, {"label": "positive"}], ['Line 2 is missing "text".']),
    "classification_extra_key": (
        [CLASSIFICATION, {**CLASSIFICATION, "id": 7}],
        ["Unsupported key `id` on line 2. Allowed keys: text, label."],
    ),
    "label_empty": (
        [CLASSIFICATION, {"text": "x", "label": ""}],
        ['"label" on line 2 must be a non-empty string or an integer, got "".'],
    ),
    "label_bool": (
        [{"text": "x", "label": 1}, {"text": "x", "label": True}],
        ['"label" on line 2 must be a non-empty string or an integer, got true.'],
    ),
    "label_float": (
        [{"text": "x", "label": 1}, {"text": "x", "label": 1.0}],
        ['"label" on line 2 must be a non-empty string or an integer, got 1.0.'],
    ),
    "label_null": ([{"text": "x", "label": None}], ['"label" on line 1 must be a non-empty string']),
    "label_list": ([CLASSIFICATION, {"text": "x", "label": ["a"]}], ['"label" on line 2 must be']),
    "integer_label_after_string_labels": (
        [CLASSIFICATION, {"text": "x", "label": "negative"}, {"text": "x", "label": 1}],
        [
            "Line 3 has integer label `1`, but earlier labels are strings like `",
            "labels must be all strings or all integers.",
        ],
    ),
    "string_label_after_integer_labels": (
        [{"text": "x", "label": 0}, {"text": "x", "label": "1"}],
        ["Line 2 has string label `1`, but earlier labels are integers like `0`"],
    ),
    "label_too_long": (
        [CLASSIFICATION, {"text": "x", "label": "x" * 257}],
        ["The label `xxx", "on line 2 is longer than 256 characters."],
    ),
    # token classification
    "tags_missing": ([NER, {"tokens": ["a"]}], ['Line 2 is missing "tags".']),
    "tokens_missing": ([NER, {"tags": ["O"]}], ['Line 2 is missing "tokens".']),
    "tokens_empty": (
        [NER, {"tokens": [], "tags": []}],
        ['"tokens" on line 2 must be a non-empty list of strings.'],
    ),
    "tags_not_list": ([NER, {"tokens": ["a"], "tags": "O"}], ['"tags" on line 2 must be a non-empty list']),
    "token_not_string": (
        [NER, {"tokens": ["a", None], "tags": ["O", "O"]}],
        ['Item 2 of "tokens" on line 2'],
    ),
    "tag_not_string": (
        [NER, {"tokens": ["a", "b"], "tags": ["O", 1]}],
        ['Item 2 of "tags" on line 2 is not a string.'],
    ),
    "tokens_and_tags_differ_in_length": (
        [NER, {"tokens": ["Diane", "Lane"], "tags": ["B-PER"]}],
        ["Line 2 has 2 tokens but 1 tags; every token needs one tag."],
    ),
    "ner_extra_key": (
        [NER, {**NER, "ner_tags": [1, 2, 0, 0]}],
        ["Unsupported key `ner_tags` on line 2. Allowed keys: tokens, tags."],
    ),
    "tag_too_long": (
        [NER, {"tokens": ["a"], "tags": ["B-" + "X" * 255]}],
        ["The tag `B-XX", "on line 2 is longer than 256 characters."],
    ),
    # preference
    "preference_missing_input": (
        [PREFERENCE, {"preferred_output": [ASSISTANT], "non_preferred_output": [NEGATIVE]}],
        ['Line 2 is missing "input".'],
    ),
    "preference_missing_non_preferred": (
        [PREFERENCE, {"input": PREFERENCE["input"], "preferred_output": [ASSISTANT]}],
        ['Line 2 is missing "non_preferred_output".'],
    ),
    "preference_missing_non_preferred_completion": (
        [PREFERENCE, {"input": PREFERENCE["input"], "preferred_completion": [ASSISTANT]}],
        ['Line 2 is missing "non_preferred_completion".'],
    ),
    "preference_both_spellings": (
        [PREFERENCE, preference(preferred_completion=[ASSISTANT])],
        ['Line 2 has both "preferred_output" and "preferred_completion"; use either'],
    ),
    "preference_mixed_spellings": (
        [
            PREFERENCE,
            {
                "input": PREFERENCE["input"],
                "preferred_output": [ASSISTANT],
                "non_preferred_completion": [NEGATIVE],
            },
        ],
        ['Line 2 has both "preferred_output" and "non_preferred_completion"'],
    ),
    "preference_extra_key": (
        [PREFERENCE, preference(metadata={})],
        ["Unsupported key `metadata` on line 2. Allowed keys: input, preferred_output"],
    ),
    "preference_input_not_object": (
        [PREFERENCE, preference(input=[USER])],
        ['"input" on line 2 must be a dictionary with "messages".'],
    ),
    "preference_input_extra_key": (
        [PREFERENCE, preference(input={"messages": [USER], "functions": []})],
        [
            'Unsupported key `functions` in "input" on line 2.',
            "Allowed keys: messages, tools, parallel_tool_calls.",
        ],
    ),
    "preference_input_messages_missing": (
        [PREFERENCE, preference(input={})],
        ['"input.messages" on line 2 must be a non-empty list of messages.'],
    ),
    "preference_input_messages_empty": (
        [PREFERENCE, preference(input={"messages": []})],
        ['"input.messages" on line 2 must be a non-empty list of messages.'],
    ),
    "preference_input_bad_tools": (
        [PREFERENCE, preference(input={"messages": [USER], "tools": [{"type": "function"}]})],
        ['"input.tools" on line 2 must be a list'],
    ),
    "preference_input_parallel_tool_calls_not_bool": (
        [PREFERENCE, preference(input={"messages": [USER], "parallel_tool_calls": "yes"})],
        ['"input.parallel_tool_calls" on line 2 must be true or false.'],
    ),
    "preference_input_bad_role": (
        [PREFERENCE, preference({"role": "bot", "content": "hi"})],
        [f'Invalid role `bot` in message 1 of "input" on line 2. Possible roles: {ROLES}.'],
    ),
    "preference_input_no_content": (
        [PREFERENCE, preference({"role": "system", "content": ""}, USER)],
        ['Message 1 of "input" on line 2 has no content.'],
    ),
    "preference_input_unknown_tool_call": (
        [PREFERENCE, preference(USER, call(), {"role": "tool", "tool_call_id": "call_2", "content": "{}"})],
        ['`call_2` of tool message 3 of "input" on line 2 does not match'],
    ),
    "preference_input_ends_with_assistant": (
        [PREFERENCE, preference(USER, ASSISTANT)],
        ['The last message of "input" on line 2 is from the assistant'],
    ),
    "preference_output_not_list": (
        [PREFERENCE, preference(preferred_output=ASSISTANT)],
        ['"preferred_output" on line 2 must be a list of exactly one assistant message.'],
    ),
    "preference_output_empty": (
        [PREFERENCE, preference(non_preferred_output=[])],
        ['"non_preferred_output" on line 2 must be a list of exactly one assistant message.'],
    ),
    "preference_output_two_messages": (
        [PREFERENCE, preference(preferred_output=[ASSISTANT, ASSISTANT])],
        ['"preferred_output" on line 2 must be a list of exactly one'],
    ),
    "preference_output_not_assistant": (
        [PREFERENCE, preference(preferred_output=[USER])],
        ['Message 1 of "preferred_output" on line 2 has role `user`; it must be `assistant`.'],
    ),
    "preference_output_no_content": (
        [PREFERENCE, preference(non_preferred_output=[{"role": "assistant", "content": None}])],
        ['Message 1 of "non_preferred_output" on line 2 has no content.'],
    ),
    "preference_output_function_call_only": (
        [
            PREFERENCE,
            preference(
                preferred_output=[{"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}]
            ),
        ],
        ['Message 1 of "preferred_output" on line 2 needs content or tool_calls.'],
    ),
    "preference_output_image": (
        [
            PREFERENCE,
            preference(
                preferred_output=[{"role": "assistant", "content": [{"type": "image_url", "image_url": {}}]}]
            ),
        ],
        ['Content part 1 of message 1 of "preferred_output" on line 2 is an image'],
    ),
    "preference_outputs_identical": (
        [PREFERENCE, preference(non_preferred_output=[ASSISTANT])],
        ['"preferred_output" and "non_preferred_output" on line 2 are identical'],
    ),
    "preference_completions_identical": (
        [
            PREFERENCE,
            {
                "input": PREFERENCE["input"],
                "preferred_completion": [NEGATIVE],
                "non_preferred_completion": [NEGATIVE],
            },
        ],
        ['"preferred_completion" and "non_preferred_completion" on line 2 are identical'],
    ),
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
    "tool_call_arguments_integer_over_4300_digits": (
        [CHAT, chat(USER, call('{"q": ' + "9" * 5000 + "}"), ASSISTANT)],
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


def test_valid_text_file(tmp_path: Path) -> None:
    path = write(tmp_path, TEXT, "", {"text": "Une critique en français.\nSur deux lignes."}, {"text": " "})
    summary = validate_file(path, param="training_file", min_examples=3, require_two_labels=True)
    assert summary == FileSummary(format="text", n_examples=3, labels=())


def test_valid_classification_file(tmp_path: Path) -> None:
    labels = ["positive", "negative", "neutral", "positive", "Mixed"]
    path = write(tmp_path, *[{"text": f"Review {i}.", "label": label} for i, label in enumerate(labels)])
    summary = validate_file(path, param="training_file", min_examples=5, require_two_labels=True)
    assert summary == FileSummary("classification", 5, ("Mixed", "negative", "neutral", "positive"))


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    path = write(tmp_path, *[{"text": "x", "label": label} for label in (10, 2, -1, 2, 0)])
    assert validate_file(path, param="training_file", min_examples=1).labels == ("-1", "0", "2", "10")


def test_valid_token_classification_file(tmp_path: Path) -> None:
    examples = [
        NER,
        {"tokens": ["Paris", "is", "lovely"], "tags": ["B-LOC", "O", "O"]},
        {"tokens": ["."], "tags": ["O"]},
    ]
    summary = validate_file(write(tmp_path, *examples), param="validation_file", min_examples=1)
    assert summary == FileSummary("token_classification", 3, ("B-LOC", "B-PER", "I-PER", "O"))


def test_valid_preference_file(tmp_path: Path) -> None:
    examples = [
        PREFERENCE,
        # OpenAI's other spelling of the outputs.
        {
            "input": {"messages": [USER]},
            "preferred_completion": [ASSISTANT],
            "non_preferred_completion": [NEGATIVE],
        },
        # Multi-turn input: the assistant may speak earlier, as long as the user speaks last.
        preference(
            {"role": "system", "content": "Classify."}, USER, ASSISTANT, {"role": "user", "content": "Sure?"}
        ),
        # Tools in the input; one output answers in text parts, the other calls a tool.
        preference(
            input={
                "messages": [
                    USER,
                    call(),
                    {"role": "tool", "tool_call_id": "call_1", "content": '{"sentiment": "positive"}'},
                    {"role": "user", "content": [{"type": "text", "text": "So?"}]},
                ],
                "tools": TOOLS,
                "parallel_tool_calls": False,
            },
            preferred_output=[{"role": "assistant", "content": [{"type": "text", "text": "positive"}]}],
            non_preferred_output=[{**call(), "content": None}],
        ),
    ]
    summary = validate_file(write(tmp_path, *examples), param="training_file", min_examples=4)
    assert summary == FileSummary(format="preference", n_examples=4, labels=())


def test_chat_summary_has_no_labels(tmp_path: Path) -> None:
    assert validate_file(write(tmp_path, CHAT), param="training_file", min_examples=1).labels == ()


def test_one_thousand_labels_are_allowed_but_not_more(tmp_path: Path) -> None:
    examples: list[Line] = [{"text": "x", "label": f"label_{i:04}"} for i in range(1000)]
    summary = validate_file(write(tmp_path, *examples), param="training_file", min_examples=1)
    assert len(summary.labels) == 1000
    assert summary.labels[:2] == ("label_0000", "label_0001")

    # Repeating a known label is fine; the first new one past 1,000 fails on its own line.
    path = write(
        tmp_path, *examples, "", {"text": "x", "label": "label_0007"}, {"text": "x", "label": "extra"}
    )
    error = error_for(path)
    assert error.code == "invalid_example"
    assert error.message == (
        "Line 1003 has label `extra`, making more than 1,000 distinct labels; a file may have at most 1,000."
    )


def test_one_thousand_tags_are_allowed_but_not_more(tmp_path: Path) -> None:
    tags = [f"T{i}" for i in range(1001)]
    ok = write(
        tmp_path, {"tokens": ["t"] * 600, "tags": tags[:600]}, {"tokens": ["t"] * 400, "tags": tags[600:1000]}
    )
    assert len(validate_file(ok, param="training_file", min_examples=1).labels) == 1000

    path = write(
        tmp_path, {"tokens": ["t"] * 600, "tags": tags[:600]}, {"tokens": ["t"] * 401, "tags": tags[600:]}
    )
    error = error_for(path)
    assert error.code == "invalid_example"
    assert "Line 2 has tag `T1000`, making more than 1,000 distinct tags" in error.message


@pytest.mark.parametrize(
    ("param", "name"), [("training_file", "Training file"), ("validation_file", "Validation file")]
)
def test_require_two_labels_rejects_a_single_label(tmp_path: Path, param: str, name: str) -> None:
    path = write(tmp_path, CLASSIFICATION, "", CLASSIFICATION)
    with pytest.raises(DataError) as info:
        validate_file(path, param=param, min_examples=1, require_two_labels=True)
    assert (info.value.code, info.value.param) == ("invalid_example", param)
    assert info.value.message == f"{name} has only one label (`positive`); a classifier needs at least two."


def test_single_label_is_fine_unless_required(tmp_path: Path) -> None:
    path = write(tmp_path, CLASSIFICATION, CLASSIFICATION)
    summary = validate_file(path, param="validation_file", min_examples=1)
    assert summary == FileSummary("classification", 2, ("positive",))


def test_require_two_labels_only_applies_to_classification(tmp_path: Path) -> None:
    path = write(tmp_path, {"tokens": ["a", "b"], "tags": ["O", "O"]})
    summary = validate_file(path, param="training_file", min_examples=1, require_two_labels=True)
    assert summary == FileSummary("token_classification", 1, ("O",))


def test_too_few_examples_is_reported_before_one_label(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        validate_file(
            write(tmp_path, CLASSIFICATION), param="training_file", min_examples=10, require_two_labels=True
        )
    assert info.value.code == "invalid_n_examples"


def test_line_longer_than_16_mib(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    path.write_bytes(
        json.dumps(TEXT).encode() + b"\n" + text_line(17 * 2**20) + b"\n" + json.dumps(TEXT).encode()
    )
    error = error_for(path)
    assert error.code == "invalid_file_format"
    assert error.message == "Line 2 is longer than 16 MiB."


@pytest.mark.parametrize(
    ("content", "ok"),
    [
        (text_line(MAX_LINE_BYTES) + b"\n", True),
        (text_line(MAX_LINE_BYTES), True),  # last line, no newline
        (text_line(MAX_LINE_BYTES + 1) + b"\n", False),
        (text_line(MAX_LINE_BYTES + 1), False),
    ],
    ids=["16_mib_with_newline", "16_mib_at_end", "one_byte_over", "one_byte_over_at_end"],
)
def test_line_length_limit_is_exact(tmp_path: Path, content: bytes, ok: bool) -> None:
    path = tmp_path / "edge.jsonl"
    path.write_bytes(json.dumps(TEXT).encode() + b"\n" + content)
    if ok:
        assert validate_file(path, param="training_file", min_examples=2) == FileSummary("text", 2)
    else:
        assert error_for(path).message == "Line 2 is longer than 16 MiB."


@pytest.mark.parametrize(
    ("name", "param", "min_examples", "expected"),
    [("train.jsonl", "training_file", 10, 400), ("validation.jsonl", "validation_file", 1, 100)],
)
def test_shared_sentiment_chat_files(name: str, param: str, min_examples: int, expected: int) -> None:
    path = SHARED_DATA / "sentiment_chat" / name
    summary = validate_file(path, param=param, min_examples=min_examples)
    assert summary == FileSummary(format="chat", n_examples=expected)


def test_shared_sentiment_classification_file() -> None:
    path = SHARED_DATA / "sentiment" / "train.jsonl"
    summary = validate_file(path, param="training_file", min_examples=10, require_two_labels=True)
    assert summary == FileSummary(format="classification", n_examples=7662, labels=("negative", "positive"))
