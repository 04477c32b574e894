"""Causal language modelling: supervised fine-tuning on chat or prompt/completion examples (loss on the
answers) and continued pre-training on raw text (loss on every token).

Full evaluation: loss, perplexity and mean token accuracy over the validation file, and for SFT the
exact-match rate of greedy generations against the final answers of a bounded sample.
"""

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from models.spec import Details, Metrics
from worker.training import distributed
from worker.training.data import IGNORE_INDEX, Example, collate, load_dataset, pack_examples
from worker.training.loading import load_model
from worker.training.objectives import BatchStats, Objective, register
from worker.training.tokens import decode, pad_token_id

MAX_ANSWER_TOKENS = 256
"""Exact-match generation stops here: a longer answer cannot match anyway once it runs past this."""


@contextmanager
def _logits_only_where(model: nn.Module, trained: torch.Tensor) -> Iterator[None]:
    """Make the output layer score only the positions whose next token is trained, flattened into one row.
    The vocabulary projection is the costliest layer of a small model and its logits the largest
    activation, and prompts and padding would pay for both to be thrown away."""

    def select(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        hidden = args[0]
        # Prompt tuning and p-tuning put virtual tokens ahead of the input; the last position predicts none.
        at = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        at[:, hidden.shape[1] - trained.shape[1] - 1 : -1] = trained
        return (hidden[at].unsqueeze(0),)

    # nn.Module types attributes as tensors or modules; a transformers model (or its PEFT wrapper) has this.
    handle = model.get_output_embeddings().register_forward_pre_hook(select)  # pyright: ignore[reportCallIssue]
    try:
        yield
    finally:
        handle.remove()


def trained_logits(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits predicting each trained token (tokens, vocabulary), those tokens, and the row of each."""
    inputs = {name: tensor for name, tensor in batch.items() if name != "labels"}
    labels = batch["labels"][:, 1:]
    trained = labels != IGNORE_INDEX
    with _logits_only_where(model, trained):
        logits = model(**inputs, use_cache=False).logits[0]
    return logits, labels[trained], trained.nonzero()[:, 0]


def token_stats(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Summed next-token cross-entropy, correct argmax predictions and count over the trained tokens."""
    logits, targets, _ = trained_logits(model, batch)
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss_sum, int((logits.argmax(dim=-1) == targets).sum()), len(targets)


@register("sft", "pretrain")
class CausalLM(Objective[Example]):
    def load_model(self, **options: Any) -> PreTrainedModel:
        return load_model(self.spec.base_model_path, self.device, **options)

    def load_examples(self, path: str, split: str) -> Sequence[Example]:
        data = load_dataset(path, self.spec.data_format, self.tokenizer, self.hp.max_seq_length)
        if data.truncated:
            self.events.log(
                f"{data.truncated} {split} examples exceed max_seq_length={self.hp.max_seq_length} "
                "and were truncated at the end",
                level="warn",
            )
        if data.dropped:
            self.events.log(f"{data.dropped} {split} examples have no trained token left; dropped", "warn")
        if split != "training":
            return data.examples
        self.truncated = data.truncated
        if not self.hp.packing:
            return data.examples
        rows = pack_examples(data.examples, self.hp.max_seq_length)
        self.events.log(f"packed {len(data.examples)} training examples into {len(rows)} rows")
        return rows

    def batch_stats(self, model: nn.Module, examples: Sequence[Example]) -> BatchStats:
        batch = {
            name: tensor.to(self.device.device)
            for name, tensor in collate(examples, pad_token_id(self.tokenizer)).items()
        }
        loss_sum, correct, units = token_stats(model, batch)
        return BatchStats(loss_sum, units, correct, sum(example.length for example in examples))

    def evaluate(self, model: nn.Module, examples: Sequence[Example]) -> tuple[Metrics, Details]:
        def score(batch: Sequence[Example]) -> tuple[float, int, int]:
            stats = self.batch_stats(model, batch)
            return stats.loss_sum.item(), int(stats.correct), stats.units

        scores = distributed.map_batches(model, score, examples, self.hp.batch_size)
        loss_sum, correct, units = (sum(column) for column in zip(*scores, strict=True))
        loss = loss_sum / units
        metrics = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "mean_token_accuracy": correct / units,
        }
        details: Details = {}
        if self.spec.objective == "sft":
            metrics["exact_match"], details["generations"] = self._exact_match(model, examples)
        return metrics, details

    def _exact_match(
        self, model: nn.Module, examples: Sequence[Example]
    ) -> tuple[float, list[dict[str, Any]]]:
        """Greedy generations for the first generation_eval_samples validation examples with a final
        answer, compared with it after trimming whitespace; the samples are kept for the job's details."""
        sample = [example for example in examples if example.prompt_ids is not None]
        sample = sample[: self.hp.generation_eval_samples]
        if not sample:
            return 0.0, []

        def generate(batch: Sequence[Example]) -> dict[str, Any]:
            (example,) = batch
            assert example.prompt_ids is not None and example.answer is not None
            answer_tokens = len(self.tokenizer(example.answer, add_special_tokens=False)["input_ids"])
            prompt = torch.tensor([example.prompt_ids], device=self.device.device)
            # nn.Module types attributes as tensors or modules; a causal LM (or its PEFT wrapper) generates.
            output = model.generate(  # pyright: ignore[reportCallIssue]
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=min(answer_tokens + 8, MAX_ANSWER_TOKENS),
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                synced_gpus=distributed.is_sharded(model),
            )
            text = decode(self.tokenizer, output[0, prompt.shape[1] :], skip_special_tokens=True)
            match = text.strip() == example.answer.strip()
            return {"expected": example.answer, "generated": text, "match": match}

        generations = distributed.map_batches(model, generate, sample, 1)
        return sum(g["match"] for g in generations) / len(generations), generations
