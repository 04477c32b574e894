"""Tokenization and loss masking: which tokens train, truncation, dropping and padding."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from tests.tiny_model import CHAT_TEMPLATE, build_tokenizer
from worker.training.data import (
    IGNORE_INDEX,
    Example,
    collate,
    load_dataset,
    tokenize_chat,
    tokenize_prompt_completion,
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer()


def ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_labels_only_weighted_assistant_turns_and_their_end(tokenizer: PreTrainedTokenizerBase) -> None:
    record = {
        "messages": [
            {"role": "developer", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Rome.", "weight": 0},
            {"role": "user", "content": "What is the capital of Spain?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"city": 1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "Madrid"},
            {"role": "assistant", "content": "The capital of Spain is Madrid.", "weight": 1},
        ],
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
    }
    # Written out by hand: developer renders as system, a null content as empty.
    context_1 = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Rome.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of Spain?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    trained_1 = "<|im_end|>\n"
    context_2 = "<|im_start|>tool\nMadrid<|im_end|>\n<|im_start|>assistant\n"
    trained_2 = "The capital of Spain is Madrid.<|im_end|>\n"

    example = tokenize_chat(tokenizer, record)

    pieces = [ids(tokenizer, text) for text in (context_1, trained_1, context_2, trained_2)]
    assert example.input_ids == [token for piece in pieces for token in piece]
    masked = [[IGNORE_INDEX] * len(piece) for piece in pieces]
    assert example.labels == masked[0] + pieces[1] + masked[2] + pieces[3]
    assert tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX]) == trained_1 + trained_2
    assert tokenizer.eos_token_id in example.labels  # the model learns to stop


def test_chat_with_only_weight_zero_turns_has_nothing_to_train(tokenizer: PreTrainedTokenizerBase) -> None:
    record = {
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi", "weight": 0},
        ]
    }
    assert set(tokenize_chat(tokenizer, record).labels) == {IGNORE_INDEX}


def test_prompt_completion_trains_completion_and_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    example = tokenize_prompt_completion(
        tokenizer, {"prompt": "What is two plus two?", "completion": " Four."}
    )
    prompt, completion = ids(tokenizer, "What is two plus two?"), ids(tokenizer, " Four.")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert example.input_ids == prompt + completion + [eos]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + completion + [eos]


def test_truncation_cuts_the_end_and_drops_empty(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    def chat(user: str, assistant: str) -> dict:
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}

    long_answer = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun."
    records = [
        chat("Hi", "Hello."),  # fits
        chat("Hi", long_answer),  # truncated, keeps part of the answer
        chat(
            "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.", "Yes."
        ),  # dropped
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")  # a blank line is skipped
    full = [tokenize_chat(tokenizer, record) for record in records]
    max_len = len(ids(tokenizer, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nThe quick brown"))
    assert len(full[0].input_ids) <= max_len < len(full[1].input_ids)

    data = load_dataset(path, "chat", tokenizer, max_len)

    assert (data.truncated, data.dropped) == (2, 1)
    assert data.examples == [
        full[0],
        replace(full[1], input_ids=full[1].input_ids[:max_len], labels=full[1].labels[:max_len]),
    ]
    assert tokenizer.decode([t for t in data.examples[1].labels if t != IGNORE_INDEX]) == "The quick brown"


def test_load_dataset_names_the_failing_line(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n"
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2"):
        load_dataset(path, "prompt_completion", tokenizer, 64)


def test_collate_pads_right_and_masks_padding() -> None:
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_token_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_tool_call_arguments_reach_the_template_as_objects(tokenizer: PreTrainedTokenizerBase) -> None:
    tool_tokenizer = copy.deepcopy(tokenizer)
    # ChatML that also renders tool calls as JSON, like tool-capable templates do.
    content = "message['content'] + (message['tool_calls'] | tojson if message['tool_calls'] else '')"
    tool_tokenizer.chat_template = CHAT_TEMPLATE.replace("message['content']", content)
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"city": "Paris"}'}}
    record = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ]
    }

    example = tokenize_chat(tool_tokenizer, record)

    trained = tool_tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
    expected_call = {**call, "function": {"name": "lookup", "arguments": {"city": "Paris"}}}
    assert trained == json.dumps([expected_call]) + "<|im_end|>\n"
