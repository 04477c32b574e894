"""JSONL examples → token ids and labels (-100 where no loss is taken) for causal-LM objectives, plus
packing and batch collation.

The runner has already validated the files, so this module only tokenizes: chat examples through the
tokenizer's own chat template, prompt/completion examples as prompt + completion + eos, raw text as
chunks of max_seq_length tokens trained on throughout.
"""

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from models.spec import DataFormat
from worker.training.batching import pack
from worker.training.tokens import render_chat

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    """Set on packed rows: positions restart at each example, which keeps attention within examples."""
    prompt_ids: list[int] | None = None
    """The context of the final answer (chat, prompt/completion), for exact-match generation."""
    answer: str | None = None

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def units(self) -> int:
        """Trained tokens: labels[0] is never predicted (nothing precedes it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    truncated: int
    """Examples longer than max_seq_length (cut at the end)."""
    dropped: int
    """Examples left without any trained token, not in `examples`."""


def load_dataset(
    path: str | Path, data_format: DataFormat, tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> Dataset:
    tokenize = TOKENIZERS[data_format]
    examples: list[Example] = []
    truncated = dropped = 0
    for line_no, record in read_jsonl(path):
        try:
            example = tokenize(tokenizer, record)
        except Exception as exc:
            raise ValueError(f"{Path(path).name} line {line_no}: {exc}") from exc
        if data_format == "text":
            # A document is not cut short: it continues in the next chunk.
            pieces = [
                Example(example.input_ids[i : i + max_seq_length], example.labels[i : i + max_seq_length])
                for i in range(0, len(example.input_ids), max_seq_length)
            ]
        elif len(example.input_ids) > max_seq_length:
            truncated += 1
            pieces = [
                replace(
                    example,
                    input_ids=example.input_ids[:max_seq_length],
                    labels=example.labels[:max_seq_length],
                )
            ]
        else:
            pieces = [example]
        for piece in pieces:
            if piece.units:
                examples.append(piece)
            else:
                dropped += 1
    return Dataset(examples, truncated, dropped)


def pack_examples(examples: list[Example], capacity: int) -> list[Example]:
    """Concatenate examples into rows of at most `capacity` tokens (best-fit decreasing), positions
    restarting at each; each example's first label is masked, as unpacked, so no token is trained on
    predicting the next example."""
    rows = []
    for row in pack([example.length for example in examples], capacity):
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for index in row:
            example = examples[index]
            input_ids += example.input_ids
            labels += [IGNORE_INDEX, *example.labels[1:]]
            positions += range(example.length)
        rows.append(Example(input_ids, labels, positions))
    return rows


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if line.strip():
                yield line_no, json.loads(line)


def tokenize_prompt_completion(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any]) -> Example:
    # Tokenized apart, as at inference where the prompt is encoded alone and the model continues it.
    prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
    completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
    completion = [*completion, tokenizer.eos_token_id]
    return Example(
        prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, None, prompt, record["completion"]
    )


def tokenize_text(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any]) -> Example:
    """Continued pre-training: every token is trained; eos marks where the document ends."""
    ids = [*tokenizer(record["text"], add_special_tokens=True)["input_ids"], tokenizer.eos_token_id]
    return Example(ids, list(ids))


def tokenize_chat(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any]) -> Example:
    """Render with the chat template; train on each assistant turn (weight != 0) up to and including
    the template's end-of-turn, found as the text between "prefix + generation prompt" and "prefix + turn"."""
    raw_messages: list[dict[str, Any]] = record["messages"]
    messages = [template_message(message) for message in raw_messages]
    tools = record.get("tools")

    def render(conversation: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return render_chat(tokenizer, conversation, tools=tools, add_generation_prompt=add_generation_prompt)

    text = render(messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(raw_messages):
        # An opening assistant turn has no prompt to render before it, so it stays context.
        if i == 0 or message["role"] != "assistant" or message.get("weight") == 0:
            continue
        prompt = render(messages[:i], add_generation_prompt=True)
        through_turn = render(messages[: i + 1])
        if not (through_turn.startswith(prompt) and text.startswith(through_turn)):
            raise ValueError(
                "the chat template does not render conversation prefixes as prefixes of the whole "
                "conversation, so assistant tokens cannot be located"
            )
        spans.append((len(prompt), len(through_turn)))

    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoding["input_ids"]
    labels = [
        token if any(start <= char_start < end for start, end in spans) else IGNORE_INDEX
        for token, (char_start, _) in zip(input_ids, encoding["offset_mapping"], strict=True)
    ]
    # The last assistant answer (when trained) is what exact-match generation checks.
    last = len(raw_messages) - 1
    if spans and raw_messages[last]["role"] == "assistant" and isinstance(raw_messages[last]["content"], str):
        prompt = render(messages[:last], add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return Example(input_ids, labels, None, prompt_ids, raw_messages[last]["content"])
    return Example(input_ids, labels)


TOKENIZERS = {"chat": tokenize_chat, "prompt_completion": tokenize_prompt_completion, "text": tokenize_text}


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """The message as chat templates expect it: no `weight`, `developer` → `system`, content never null
    (templates concatenate it), tool-call arguments as objects (templates `tojson` them)."""
    out = {key: value for key, value in message.items() if key != "weight"}
    if out["role"] == "developer":
        out["role"] = "system"
    if out.get("content") is None:
        out["content"] = ""
    if "tool_calls" in out:
        out["tool_calls"] = [_parsed_arguments(call) for call in out["tool_calls"]]
    return out


def _parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not (isinstance(function, dict) and isinstance(function.get("arguments"), str)):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of the loss, and out of attention by the
    attention mask, or for packed rows by positions (a row's padding is one more "example" at its end)."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    position_ids = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
        if example.position_ids is not None:
            position_ids[row, :length] = torch.tensor(example.position_ids)
            position_ids[row, length:] = torch.arange(width - length)
    if examples[0].position_ids is not None:
        # transformers builds a block-diagonal causal mask from restarting positions, but only when no
        # attention mask is given and no cache is used (the objectives call the model with use_cache=False).
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
