"""OpenAI's sampling semantics for generated rows: what the batches of `inference.batching` use, and
`generate` on one prompt through transformers' `generate` (for the prompt methods, which are not batched).

- `n` choices are `n` rows (the prompt repeated).
- Sampling (temperature > 0) draws with a per-request `torch.Generator`, row after row: the global RNG is
  shared by every thread of the server, a request's own generator is not, so the same `seed` gives the
  same output whatever else runs at the time. In `generate` it runs as the last logits processor, and
  `generate` itself stays greedy.
- Each row's logits are adjusted before its draw, as OpenAI defines: `logit_bias` added, then
  `frequency_penalty` × (times the token was generated in this row) and `presence_penalty` × (whether it
  was) subtracted, then tokens the row's `response_format` grammar forbids masked (`inference.constrained`).
  Temperature and top_p apply after. Rows of one batch each use their own request's settings.
- `logprobs` are the model's own log probabilities (log-softmax of its raw logits, before bias, penalties,
  grammar and temperature) of each generated token but the end-of-sequence, with the k most likely
  alternatives.
- Each row's text is followed (`Row`): it is cut at the first stop string (which is never returned), a
  row ends on an end-of-sequence token, and text is reported as it becomes final, holding back a tail that
  could still start a stop string or is an unfinished UTF-8 character.
"""

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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

from inference.constrained import Grammar, Matcher, token_bytes
from worker.training.tokens import decode

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TokenLogprob:
    token: bytes
    """The generated token, as its own bytes."""
    logprob: float
    top: list[tuple[bytes, float]]
    """The most likely tokens at this position and their log probabilities, most likely first."""


OnEvent = Callable[[int, str, FinishReason | None, list[TokenLogprob]], None]
"""Streaming callback: (row, text delta, finish reason once the row is done, the logprobs of the tokens
generated since the last call when the request asked for them)."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    stop: Sequence[str] = ()
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    """None: no logprobs; else how many alternatives each token lists."""
    grammar: Grammar | None = None
    """What every row's answer must follow (`response_format`)."""

    def adjusts(self) -> bool:
        """Whether the logits are changed before the draw."""
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias or self.grammar)


@dataclass(frozen=True)
class Output:
    token_ids: list[int]
    """Every generated token, the stop string's and end-of-sequence included (what usage counts)."""
    text: str
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None


class Sampler(LogitsProcessor):
    """Draws each row's next token as `choose_tokens` does, and leaves that token the only finite score so
    greedy selection takes it."""

    def __init__(self, sampling: Sampling, generator: torch.Generator, rows: list["Row"]) -> None:
        self.sampling, self.generator, self.rows = sampling, generator, rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = choose_tokens(scores, [(self.sampling, self.generator, row) for row in self.rows])
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
    def __init__(self, tokenizer: PreTrainedTokenizerBase, sampling: Sampling, eos: set[int]) -> None:
        self.tokenizer, self.eos = tokenizer, eos
        self.scanner = StopScanner(sampling.stop)
        self.matcher: Matcher | None = sampling.grammar.matcher() if sampling.grammar else None
        self.logprobs: list[TokenLogprob] | None = [] if sampling.logprobs is not None else None
        self.reported = 0
        """Entries of `logprobs` already reported."""
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0
        """Characters of `text` already reported."""
        self.finish: FinishReason | None = None

    def add(self, token: int, last: bool) -> str:
        """Take one generated token; return the text that became final."""
        self.token_ids.append(token)
        if self.matcher is not None:
            self.matcher.advance(token)
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

    def unreported_logprobs(self) -> list[TokenLogprob]:
        """The logprobs of the tokens taken since the last call (none unless the request asked)."""
        if self.logprobs is None:
            return []
        entries, self.reported = self.logprobs[self.reported :], len(self.logprobs)
        return entries

    def output(self) -> Output:
        return Output(self.token_ids, self.text, self.finish or "length", self.logprobs)

    def report(self, on_event: OnEvent | None, index: int, delta: str) -> None:
        """Tell `on_event` (if any) the text that became final and, once, that the row is done."""
        if on_event is None or not (delta or self.finish):
            return
        logprobs = self.unreported_logprobs()
        if delta:
            on_event(index, delta, None, logprobs)
            logprobs = []
        if self.finish:
            on_event(index, "", self.finish, logprobs)


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
            row.report(self.on_event, index, row.add(token, last))
        done = [row.finish is not None for row in self.rows]
        if self.cancelled is not None and self.cancelled.is_set():
            done = [True] * len(done)  # the client went away: stop computing
        # transformers annotates the legacy tensor class, which no torch function is typed to return.
        return cast(torch.BoolTensor, torch.tensor(done, device=input_ids.device))


def choose_tokens(logits: torch.Tensor, rows: Sequence[tuple[Sampling, torch.Generator, "Row"]]) -> list[int]:
    """Each row's next token from its logits, adjusted by its request's settings: greedy at temperature 0,
    else drawn with the row's request's generator, row after row (so a request's draws don't depend on the
    rows around it). Rows asking for logprobs get the chosen token's."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for index, (sampling, generator, row) in enumerate(rows):
        if row.finish is not None:  # transformers' generate pads a finished row; its token is not used
            tokens.append(greedy[index])
            continue
        scores = logits[index].float()
        if sampling.adjusts():
            scores = adjusted(scores, sampling, row)
        if sampling.temperature == 0:
            token = greedy[index] if not sampling.adjusts() else int(scores.argmax())
        else:
            scores = scores[None] / sampling.temperature
            if sampling.top_p < 1.0:
                # The warper reads only the scores; its input_ids parameter serves other processors'.
                scores = TopPLogitsWarper(sampling.top_p)(None, scores)  # pyright: ignore[reportArgumentType]
            token = int(torch.multinomial(scores.softmax(dim=-1).cpu(), 1, generator=generator))
        if row.logprobs is not None and token not in row.eos:
            row.logprobs.append(token_logprob(row.tokenizer, logits[index], token, sampling.logprobs or 0))
        tokens.append(token)
    return tokens


def adjusted(scores: torch.Tensor, sampling: Sampling, row: "Row") -> torch.Tensor:
    """One row's logits with its bias and penalties applied and what its grammar forbids masked."""
    scores = scores.clone()
    if sampling.logit_bias:
        ids = torch.tensor(list(sampling.logit_bias), dtype=torch.long, device=scores.device)
        scores[ids] += torch.tensor(list(sampling.logit_bias.values()), device=scores.device)
    if (sampling.frequency_penalty or sampling.presence_penalty) and row.token_ids:
        counts = torch.bincount(torch.tensor(row.token_ids), minlength=len(scores))[: len(scores)]
        counts = counts.to(scores.device, scores.dtype)
        scores -= (
            counts * sampling.frequency_penalty + (counts > 0).to(scores.dtype) * sampling.presence_penalty
        )
    if row.matcher is not None:
        scores = scores.masked_fill(~row.matcher.allowed(len(scores)).to(scores.device), -float("inf"))
    return scores


def token_logprob(
    tokenizer: PreTrainedTokenizerBase, logits: torch.Tensor, token: int, alternatives: int
) -> TokenLogprob:
    logprobs = logits.float().log_softmax(dim=-1)
    top = logprobs.topk(alternatives) if alternatives else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    return TokenLogprob(
        token_bytes(tokenizer, token),
        float(logprobs[token]),
        [(token_bytes(tokenizer, alternative), value) for alternative, value in pairs],
    )


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
    rows = [Row(tokenizer, sampling, eos) for _ in range(sampling.n)]
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids] * sampling.n, dtype=torch.long, device=device)
    processors = LogitsProcessorList()
    if sampling.temperature > 0 or sampling.adjusts() or sampling.logprobs is not None:
        processors.append(Sampler(sampling, generator, rows))
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
    return [row.output() for row in rows]
