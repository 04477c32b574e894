"""Constrained decoding for `response_format` (json_object, json_schema), with llguidance: a request's
schema is compiled once into a grammar for the model's tokenizer, each row follows it with a matcher of its
own, and at every step a row may only draw the tokens its matcher allows (end-of-sequence once, and only
once, the JSON is complete). Matchers are per row, so rows of one batch follow different schemas, or none.

Also the exact bytes of a token, which the logprobs shapes report.
"""

import json
import threading
from collections.abc import Iterable
from typing import Any
from weakref import WeakKeyDictionary

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from models.errors import APIError

_tokenizers: "WeakKeyDictionary[PreTrainedTokenizerBase, dict[tuple[int, ...], llguidance.LLTokenizer]]" = (
    WeakKeyDictionary()
)
_lock = threading.Lock()


def lltokenizer(tokenizer: PreTrainedTokenizerBase, eos: Iterable[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a served tokenizer (built once per tokenizer and end-of-sequence set)."""
    key = tuple(sorted(eos))
    with _lock:
        built = _tokenizers.setdefault(tokenizer, {})
        if key not in built:
            # llguidance reads a fast tokenizer's own description; the served ones are all fast.
            built[key] = llguidance.hf.from_tokenizer(
                tokenizer,  # pyright: ignore[reportArgumentType]
                eos_token=list(key) or None,
            )
        return built[key]


def token_bytes(tokenizer: PreTrainedTokenizerBase, token: int) -> bytes:
    """A token's own bytes: a byte-level piece may be part of a UTF-8 character, which decode() can't show."""
    return lltokenizer(tokenizer, ()).decode_bytes([token])


class Grammar:
    """A JSON schema compiled for one tokenizer; a bad schema is a 400 naming `response_format`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos: set[int], schema: dict[str, Any]) -> None:
        self.tokenizer = lltokenizer(tokenizer, eos)
        # Compact JSON: no runs of whitespace for a model to wander in.
        try:
            self.grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False}
            )
            message = llguidance.LLMatcher.validate_grammar(self.grammar, self.tokenizer)
        except ValueError as error:
            message = str(error)
        if message:
            raise APIError(
                f"response_format's JSON schema cannot be followed: {message}",
                param="response_format",
            )

    def matcher(self) -> "Matcher":
        return Matcher(llguidance.LLMatcher(self.tokenizer, self.grammar))


class Matcher:
    """One row's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def allowed(self, width: int) -> torch.Tensor:
        """Which of `width` logits the row may draw next (a token past the tokenizer's vocabulary never)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.zeros(width, dtype=torch.bool)
        known = min(width, len(bits))
        mask[:known] = torch.from_numpy(bits[:known].astype(bool))
        return mask

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)
