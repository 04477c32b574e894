"""OpenAI's response objects, field for field: `chat.completion`, `chat.completion.chunk`,
`text_completion` (whole and streamed), and our `classification` list. `system_fingerprint` is left out:
we have none, and the openai SDKs declare it optional but not nullable."""

import secrets
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from inference.generation import FinishReason, Output

Chunk = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(outputs: Sequence[Output], prompt_lengths: Sequence[int]) -> dict[str, int]:
    # Each prompt counts once however many choices it has, as OpenAI counts it.
    prompt, completion = sum(prompt_lengths), sum(len(output.token_ids) for output in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion(model: str, outputs: Sequence[Output], prompt_lengths: Sequence[int]) -> Chunk:
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": output.text, "refusal": None},
                "logprobs": None,
                "finish_reason": output.finish_reason,
            }
            for index, output in enumerate(outputs)
        ],
        "usage": usage(outputs, prompt_lengths),
    }


def text_completion(model: str, outputs: Sequence[Output], prompt_lengths: Sequence[int]) -> Chunk:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"text": output.text, "index": index, "logprobs": None, "finish_reason": output.finish_reason}
            for index, output in enumerate(outputs)
        ],
        "usage": usage(outputs, prompt_lengths),
    }


def classifications(model: str, labels: Sequence[str], probabilities: np.ndarray) -> Chunk:
    data = []
    for index, row in enumerate(probabilities.tolist()):
        best = max(range(len(labels)), key=row.__getitem__)
        data.append(
            {
                "object": "classification",
                "index": index,
                "label": labels[best],
                "score": row[best],
                "scores": dict(zip(labels, row, strict=True)),
            }
        )
    return {"object": "list", "model": model, "data": data}


class ChunkMaker(Protocol):
    def opening(self, index: int) -> list[Chunk]:
        """What a choice's stream starts with, before any text."""
        ...

    def delta(self, index: int, text: str, finish: FinishReason | None) -> Chunk: ...

    def usage(self, usage: dict[str, int]) -> Chunk:
        """The last chunk when `stream_options.include_usage`: no choices."""
        ...


class _Chunks:
    """One stream's chunks share its id and creation time; with include_usage every chunk carries
    `usage: null` until the last, as OpenAI sends them."""

    object: str
    prefix: str

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id, self.created, self.model = new_id(self.prefix), int(time.time()), model
        self.include_usage = include_usage

    def chunk(self, choices: list[Chunk], usage: dict[str, int] | None = None) -> Chunk:
        chunk: Chunk = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return chunk

    def usage(self, usage: dict[str, int]) -> Chunk:
        return self.chunk([], usage)


class ChatChunks(_Chunks):
    object, prefix = "chat.completion.chunk", "chatcmpl"

    def opening(self, index: int) -> list[Chunk]:
        delta = {"role": "assistant", "content": "", "refusal": None}
        return [self.chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])]

    def delta(self, index: int, text: str, finish: FinishReason | None) -> Chunk:
        delta = {} if finish else {"content": text}
        return self.chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}])


class TextChunks(_Chunks):
    object, prefix = "text_completion", "cmpl"

    def opening(self, index: int) -> list[Chunk]:
        return []  # legacy completions stream text from the first chunk

    def delta(self, index: int, text: str, finish: FinishReason | None) -> Chunk:
        return self.chunk([{"text": text, "index": index, "logprobs": None, "finish_reason": finish}])
