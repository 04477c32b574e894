"""Tokenizer calls on one conversation or one sequence, typed as such: transformers types them for batches
and token ids too, so their results are unions that every caller would have to narrow."""

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    conversation: list[dict[str, Any]],
    *,
    tools: list[Any] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as the tokenizer's chat template renders it, as text."""
    text = tokenizer.apply_chat_template(
        conversation, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    if not isinstance(text, str):
        raise TypeError(f"the chat template rendered a {type(text).__name__}, not text")
    return text


def decode(
    tokenizer: PreTrainedTokenizerBase, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False
) -> str:
    """One sequence of token ids as text."""
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    if not isinstance(text, str):
        raise TypeError("decode was given a batch; it takes one sequence")
    return text


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id batches are padded with: `load_tokenizer` makes eos the pad token where there is none."""
    pad = tokenizer.pad_token_id
    if not isinstance(pad, int):
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
    return pad
