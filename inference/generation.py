"""Text generation on one prompt with OpenAI's sampling semantics, through transformers' `generate`.

- `n` choices are `n` rows of one batch (the prompt repeated).
- Sampling (temperature > 0) runs as the last logits processor with a per-request `torch.Generator`, and
  `generate` itself stays greedy: the global RNG is shared by every thread of the server, a request's own
  generator is not, so the same `seed` gives the same output whatever else runs at the time.
- One stopping criterion follows every row's text: it cuts at the first stop string (which is never
  returned), ends a row on an end-of-sequence token, and reports text as it becomes final, holding back a
  tail that could still start a stop string or is an unfinished UTF-8 character.
"""

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TopPLogitsWarper,
)

from worker.training.tokens import decode

FinishReason = Literal["stop", "length"]
OnEvent = Callable[[int, str, FinishReason | None], None]
"""Streaming callback: (row, text delta, finish reason once the row is done)."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    stop: Sequence[str] = ()
    n: int = 1


@dataclass(frozen=True)
class Output:
    token_ids: list[int]
    """Every generated token, the stop string's and end-of-sequence included (what usage counts)."""
    text: str
    finish_reason: FinishReason


class Sampler(LogitsProcessor):
    """Draws each row's next token from its temperature/top-p distribution with the request's generator,
    and leaves that token the only finite score so greedy selection takes it."""

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator) -> None:
        self.temperature, self.generator = temperature, generator
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        probs = scores.float().softmax(dim=-1)
        chosen = torch.multinomial(probs.cpu(), 1, generator=self.generator).to(scores.device)
        return torch.full_like(scores, -float("inf")).scatter_(1, chosen, 0.0)


class _Row:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], eos: set[int]) -> None:
        self.tokenizer, self.stop, self.eos = tokenizer, stop, eos
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0
        """Characters of `text` already reported."""
        self.finish: FinishReason | None = None

    def add(self, token: int, last: bool) -> str:
        """Take one generated token; return the text that became final."""
        self.token_ids.append(token)
        if token in self.eos:
            self.finish = "stop"
            return self._flush()
        # Byte-level BPE decodes prefix-stably, so the growing decode is the text so far.
        self.text = decode(
            self.tokenizer, [t for t in self.token_ids if t not in self.eos], skip_special_tokens=True
        )
        cuts = [index for s in self.stop if (index := self.text.find(s)) >= 0]
        if cuts:
            self.text, self.finish = self.text[: min(cuts)], "stop"
            return self._flush()
        if last:
            self.finish = "length"
            return self._flush()
        final = len(self.text) - self._held()
        delta, self.sent = self.text[self.sent : final], max(self.sent, final)
        return delta

    def _held(self) -> int:
        """Length of the tail that may not be reported yet."""
        if self.text.endswith("\ufffd"):
            return 1  # the decode of an incomplete multi-byte character
        return max(
            (k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])),
            default=0,
        )

    def _flush(self) -> str:
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta


class _Tracker(StoppingCriteria):
    """Called by `generate` after each step with the sequences so far; returns which rows are done."""

    def __init__(
        self,
        rows: list[_Row],
        prompt_length: int,
        max_new_tokens: int,
        on_event: OnEvent | None,
        cancelled: threading.Event | None,
    ) -> None:
        self.rows, self.prompt_length, self.max_new_tokens = rows, prompt_length, max_new_tokens
        self.on_event, self.cancelled = on_event, cancelled

    def __call__(
        self, input_ids: torch.LongTensor, scores: tuple[torch.Tensor] | None, **kwargs: object
    ) -> torch.BoolTensor:
        last = input_ids.shape[1] - self.prompt_length >= self.max_new_tokens
        for index, (row, token) in enumerate(zip(self.rows, input_ids[:, -1].tolist(), strict=True)):
            if row.finish is not None:
                continue  # generate pads rows that are done; they have nothing more to say
            delta = row.add(token, last)
            if self.on_event is not None and (delta or row.finish):
                if delta:
                    self.on_event(index, delta, None)
                if row.finish:
                    self.on_event(index, "", row.finish)
        done = [row.finish is not None for row in self.rows]
        if self.cancelled is not None and self.cancelled.is_set():
            done = [True] * len(done)  # the client went away: stop computing
        # transformers annotates the legacy tensor class, which no torch function is typed to return.
        return cast(torch.BoolTensor, torch.tensor(done, device=input_ids.device))


def eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """What ends an answer: the tokenizer's eos and the model's generation eos (one id or several)."""
    ids = {eos} if isinstance(eos := tokenizer.eos_token_id, int) else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return ids


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    sampling: Sampling,
    generator: torch.Generator,
    on_event: OnEvent | None = None,
    cancelled: threading.Event | None = None,
) -> list[Output]:
    """`sampling.n` continuations of `prompt_ids`, one per row; `on_event` hears each row's text as it is
    final and its finish reason."""
    eos = eos_token_ids(model, tokenizer)
    rows = [_Row(tokenizer, sampling.stop, eos) for _ in range(sampling.n)]
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids] * sampling.n, dtype=torch.long, device=device)
    processors = LogitsProcessorList()
    if sampling.temperature > 0:
        processors.append(Sampler(sampling.temperature, sampling.top_p, generator))
    tracker = _Tracker(rows, len(prompt_ids), sampling.max_new_tokens, on_event, cancelled)
    # nn.Module types attributes as tensors or modules; a causal LM (or its PEFT wrapper) generates.
    model.generate(  # pyright: ignore[reportCallIssue]
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=sorted(eos) or None,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=processors,
        stopping_criteria=StoppingCriteriaList([tracker]),
    )
    return [Output(row.token_ids, row.text, row.finish or "length") for row in rows]
