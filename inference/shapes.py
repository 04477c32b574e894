"""OpenAI's response objects, field for field: `chat.completion`, `chat.completion.chunk`,
`text_completion` (whole and streamed), and our `classification` list. `system_fingerprint` is left out:
we have none, and the openai SDKs declare it optional but not nullable."""

import secrets
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from inference.generation import FinishReason, Output, TokenLogprob

Chunk = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(outputs: Sequence[Output], prompt_lengths: Sequence[int]) -> dict[str, int]:
    # Each prompt counts once however many choices it has, as OpenAI counts it.
    prompt, completion = sum(prompt_lengths), sum(len(output.token_ids) for output in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_text(token: bytes) -> str:
    """A token as OpenAI shows it: its text, or `bytes:\\x..` for a piece of a UTF-8 character."""
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in token)


def chat_logprobs(entries: list[TokenLogprob] | None) -> Chunk | None:
    """A chat choice's `logprobs`: openai.types.chat.ChatCompletionTokenLogprob per token."""
    if entries is None:
        return None

    def entry(token: bytes, logprob: float) -> Chunk:
        return {"token": token_text(token), "logprob": logprob, "bytes": list(token)}

    content = [
        {**entry(e.token, e.logprob), "top_logprobs": [entry(token, value) for token, value in e.top]}
        for e in entries
    ]
    return {"content": content, "refusal": None}


def text_logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> Chunk | None:
    """A completion choice's `logprobs` (the legacy shape); `text_offset` counts characters of the choice's
    text from `offset`."""
    if entries is None:
        return None
    tokens = [token_text(e.token) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{token_text(token): value for token, value in e.top} for e in entries],
        "text_offset": offsets,
    }


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
                "logprobs": chat_logprobs(output.logprobs),
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
            {
                "text": output.text,
                "index": index,
                "logprobs": text_logprobs(output.logprobs),
                "finish_reason": output.finish_reason,
            }
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

    def delta(
        self, index: int, text: str, finish: FinishReason | None, logprobs: list[TokenLogprob]
    ) -> Chunk:
        """A choice's next text (or its end), with its tokens' logprobs if the request asked for them."""
        ...

    def usage(self, usage: dict[str, int]) -> Chunk:
        """The last chunk when `stream_options.include_usage`: no choices."""
        ...


class _Chunks:
    """One stream's chunks share its id and creation time; with include_usage every chunk carries
    `usage: null` until the last, as OpenAI sends them."""

    object: str
    prefix: str

    def __init__(self, model: str, include_usage: bool, logprobs: bool) -> None:
        self.id, self.created, self.model = new_id(self.prefix), int(time.time()), model
        self.include_usage, self.logprobs = include_usage, logprobs

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

    def delta(
        self, index: int, text: str, finish: FinishReason | None, logprobs: list[TokenLogprob]
    ) -> Chunk:
        delta = {} if finish else {"content": text}
        entries = chat_logprobs(logprobs if self.logprobs else None)
        return self.chunk([{"index": index, "delta": delta, "logprobs": entries, "finish_reason": finish}])


class TextChunks(_Chunks):
    object, prefix = "text_completion", "cmpl"

    def __init__(self, model: str, include_usage: bool, logprobs: bool) -> None:
        super().__init__(model, include_usage, logprobs)
        self.offsets: dict[int, int] = {}
        """Per choice: characters its tokens have covered so far, where the next text_offset starts."""

    def opening(self, index: int) -> list[Chunk]:
        return []  # legacy completions stream text from the first chunk

    def delta(
        self, index: int, text: str, finish: FinishReason | None, logprobs: list[TokenLogprob]
    ) -> Chunk:
        entries = text_logprobs(logprobs, self.offsets.get(index, 0)) if self.logprobs else None
        if entries is not None and entries["tokens"]:
            self.offsets[index] = entries["text_offset"][-1] + len(entries["tokens"][-1])
        return self.chunk([{"text": text, "index": index, "logprobs": entries, "finish_reason": finish}])
