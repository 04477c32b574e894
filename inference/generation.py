"""OpenAI's sampling semantics for generated rows: what the batches of `inference.batching` use, and
`generate` on one prompt through transformers' `generate` (for the prompt methods, which are not batched).

- `n` choices are `n` rows (the prompt repeated).
- Sampling (temperature > 0) draws with a per-request `torch.Generator`, row after row: the global RNG is
  shared by every thread of the server, a request's own generator is not, so the same `seed` gives the
  same output whatever else runs at the time. In `generate` it runs as the last logits processor, and
  `generate` itself stays greedy.
- Each row's text is followed (`Row`): it is cut at the first stop string (which is never returned), a
  row ends on an end-of-sequence token, and text is reported as it becomes final, holding back a tail that
  could still start a stop string or is an unfinished UTF-8 character.
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
    """Draws each row's next token as `choose_tokens` does, and leaves that token the only finite score so
    greedy selection takes it."""

    def __init__(self, sampling: Sampling, generator: torch.Generator) -> None:
        self.sampling, self.generator = sampling, generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = choose_tokens(scores, [(self.sampling, self.generator)] * len(scores))
        indices = torch.tensor(chosen, device=scores.device)[:, None]
        return torch.full_like(scores, -float("inf")).scatter_(1, indices, 0.0)


class StopScanner:
    """Knuth-Morris-Pratt over a text that grows at its end: the first stop string in it, and the longest
    tail that could still start one, in time linear in the text (each stop string is read once, up front)."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = list(stop)
        self.failure = [failure(s) for s in self.stop]
        self.matched = [0] * len(self.stop)
        """Per stop string: how many of its first characters the text read so far ends with."""
        self.read = 0

    def feed(self, text: str) -> int | None:
        """Read `text` past what was read before; where the earliest stop string in it starts, if any."""
        cut: int | None = None
        for position in range(self.read, len(text)):
            char = text[position]
            for index, stop in enumerate(self.stop):
                k, table = self.matched[index], self.failure[index]
                while k and stop[k] != char:
                    k = table[k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):
                    start = position - k + 1
                    cut = start if cut is None else min(cut, start)
                    k = table[k - 1]
                self.matched[index] = k
        self.read = len(text)
        return cut

    def held(self) -> int:
        """Length of the tail read so far that may yet become the start of a stop string."""
        return max(self.matched, default=0)


def failure(pattern: str) -> list[int]:
    """KMP's table: for each prefix of `pattern`, its longest proper prefix that is also its suffix."""
    table = [0] * len(pattern)
    k = 0
    for position in range(1, len(pattern)):
        while k and pattern[position] != pattern[k]:
            k = table[k - 1]
        if pattern[position] == pattern[k]:
            k += 1
        table[position] = k
    return table


class Row:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], eos: set[int]) -> None:
        self.tokenizer, self.eos = tokenizer, eos
        self.scanner = StopScanner(stop)
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
        # Byte-level BPE decodes prefix-stably, so the growing decode is the text so far; but for a trailing
        # unfinished UTF-8 character (decoded as U+FFFD), which the next token may complete.
        self.text = decode(
            self.tokenizer, [t for t in self.token_ids if t not in self.eos], skip_special_tokens=True
        )
        settled = self.text.rstrip("\ufffd")
        cut = self.scanner.feed(settled)
        if cut is not None:
            self.text, self.finish = self.text[:cut], "stop"
            return self._flush()
        if last:
            self.finish = "length"
            return self._flush()
        final = len(settled) - self.scanner.held()
        delta, self.sent = self.text[self.sent : final], max(self.sent, final)
        return delta

    def _flush(self) -> str:
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta


class _Tracker(StoppingCriteria):
    """Called by `generate` after each step with the sequences so far; returns which rows are done."""

    def __init__(
        self,
        rows: list[Row],
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


def choose_tokens(logits: torch.Tensor, samplings: Sequence[tuple[Sampling, torch.Generator]]) -> list[int]:
    """Each row's next token from its logits: greedy at temperature 0, else drawn with the row's request's
    generator, row after row (so a request's draws don't depend on the rows around it)."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for index, (sampling, generator) in enumerate(samplings):
        if sampling.temperature == 0:
            tokens.append(greedy[index])
            continue
        scores = logits[index : index + 1].float() / sampling.temperature
        if sampling.top_p < 1.0:
            # The warper reads only the scores; its input_ids parameter serves other processors' signatures.
            scores = TopPLogitsWarper(sampling.top_p)(None, scores)  # pyright: ignore[reportArgumentType]
        tokens.append(int(torch.multinomial(scores.softmax(dim=-1).cpu(), 1, generator=generator)))
    return tokens


def eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """What ends an answer: the tokenizer's eos and the model's generation eos (one id or several)."""
    return generation_eos(getattr(model, "generation_config", None), tokenizer)


def generation_eos(generation_config: object, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """`eos_token_ids` from a generation config (or None) rather than a loaded model."""
    ids = {eos} if isinstance(eos := tokenizer.eos_token_id, int) else set()
    configured = getattr(generation_config, "eos_token_id", None)
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
    rows = [Row(tokenizer, sampling.stop, eos) for _ in range(sampling.n)]
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids] * sampling.n, dtype=torch.long, device=device)
    processors = LogitsProcessorList()
    if sampling.temperature > 0:
        processors.append(Sampler(sampling, generator))
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
