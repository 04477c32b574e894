"""Causal language modelling: supervised fine-tuning on chat or prompt/completion examples (loss on the
answers) and continued pre-training on raw text (loss on every token).

Full evaluation: loss, perplexity and mean token accuracy over the validation file, and for SFT the
exact-match rate of greedy generations against the final answers of a bounded sample.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from models.spec import Details, Metrics
from worker.training.data import IGNORE_INDEX, Example, collate, load_dataset, pack_examples
from worker.training.loading import load_model
from worker.training.objectives import BatchStats, Objective, register

MAX_ANSWER_TOKENS = 256
"""Exact-match generation stops here: a longer answer cannot match anyway once it runs past this."""


def next_token_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits at each position but the last, and the labels they predict (the next tokens')."""
    inputs = {name: tensor for name, tensor in batch.items() if name != "labels"}
    output = model(**inputs, use_cache=False)
    # Prompt tuning and p-tuning return logits for their virtual tokens too, ahead of the input's.
    n_positions = batch["input_ids"].shape[1]
    return output.logits[:, -n_positions:-1], batch["labels"][:, 1:]


def token_stats(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Summed next-token cross-entropy, correct argmax predictions and count over the trained tokens."""
    logits, labels = next_token_logits(model, batch)
    trained = labels != IGNORE_INDEX
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    correct = int(((logits.argmax(dim=-1) == labels) & trained).sum())
    return loss_sum, correct, int(trained.sum())


@register("sft", "pretrain")
class CausalLM(Objective):
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
            for name, tensor in collate(examples, self.tokenizer.pad_token_id).items()
        }
        loss_sum, correct, units = token_stats(model, batch)
        return BatchStats(loss_sum, units, correct, sum(example.length for example in examples))

    def evaluate(self, model: nn.Module, examples: Sequence[Example]) -> tuple[Metrics, Details]:
        size = self.hp.batch_size
        loss_sum = correct = units = 0.0
        for start in range(0, len(examples), size):
            stats = self.batch_stats(model, examples[start : start + size])
            loss_sum, correct, units = (
                loss_sum + stats.loss_sum.item(),
                correct + stats.correct,
                units + stats.units,
            )
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
        generations = []
        for example in sample:
            assert example.prompt_ids is not None and example.answer is not None
            answer_tokens = len(self.tokenizer(example.answer, add_special_tokens=False)["input_ids"])
            prompt = torch.tensor([example.prompt_ids], device=self.device.device)
            output = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=min(answer_tokens + 8, MAX_ANSWER_TOKENS),
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            text = self.tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True)
            generations.append(
                {
                    "expected": example.answer,
                    "generated": text,
                    "match": text.strip() == example.answer.strip(),
                }
            )
        return sum(g["match"] for g in generations) / len(generations), generations
