"""Supervised fine-tuning recipe: setup → fit (train steps, validation, checkpoints) → save.

A plain loop rather than HF Trainer, so every piece of state (data order, optimizer, scheduler, RNG) is
ours to checkpoint and resume exactly.
"""

import csv
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_scheduler,
    set_seed,
)

from models.spec import (
    CheckpointMessage,
    CompletedMessage,
    Metrics,
    MetricsMessage,
    StartedMessage,
    StoppedMessage,
    TrainingSpec,
)
from worker.training.checkpoint import (
    Progress,
    job_fingerprint,
    read_progress,
    restore_state,
    save_checkpoint,
)
from worker.training.data import IGNORE_INDEX, Dataset, Example, collate, load_dataset
from worker.training.device import DeviceConfig, select_device
from worker.training.events import EventWriter
from worker.training.methods import get_method

MAX_GRAD_NORM = 1.0
CSV_HEADER = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
CSV_METRICS = ["train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy"]
"""The metrics behind CSV_HEADER[1:] (OpenAI's results file calls train accuracy `train_accuracy`)."""


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if tokenizer.pad_token is None:
        # Padding is masked by position (attention mask, -100 labels), so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, device: DeviceConfig, **options: Any) -> PreTrainedModel:
    """The base model on the device; `options` are a method's extra `from_pretrained` arguments."""
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=device.dtype,
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
        **options,
    )
    return model.to(device.device)


def count_parameters(parameters: Iterable[nn.Parameter]) -> int:
    # A 4-bit weight stores two values per byte; count its values (its original shape), like any weight's.
    return sum(
        quant.shape.numel() if (quant := getattr(p, "quant_state", None)) else p.numel() for p in parameters
    )


def token_stats(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Summed next-token cross-entropy, correct argmax predictions and count over the trained tokens."""
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    # Prompt tuning and p-tuning return logits for their virtual tokens too, ahead of the input's.
    n_positions = batch["input_ids"].shape[1]
    logits, labels = output.logits[:, -n_positions:-1], batch["labels"][:, 1:]
    trained = labels != IGNORE_INDEX
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    correct = int(((logits.argmax(dim=-1) == labels) & trained).sum())
    return loss_sum, correct, int(trained.sum())


class SFTRecipe:
    def __init__(self, spec: TrainingSpec, events: EventWriter) -> None:
        self.spec = spec
        self.hp = spec.hyperparameters
        self.events = events
        self.output_dir = Path(spec.output_dir)
        self.resume_from = Path(spec.resume_from) if spec.resume_from else None
        self.progress = Progress()

    def setup(self) -> None:
        set_seed(self.spec.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.device = select_device()
        self.tokenizer = load_tokenizer(self.spec.base_model_path)
        train_data = self._load(self.spec.training_file, "training")
        self.train_examples = train_data.examples
        valid_file = self.spec.validation_file
        self.valid_examples = self._load(valid_file, "validation").examples if valid_file else []
        if not self.train_examples:
            raise ValueError("no training example has a trained token left")

        self.total_steps = self.hp.n_epochs * math.ceil(len(self.train_examples) / self.hp.batch_size)
        self.fingerprint = job_fingerprint(self.spec, len(self.train_examples), len(self.valid_examples))
        if self.resume_from:
            # Before the model loads: a checkpoint of another job fails the attempt at once.
            self.progress = read_progress(self.resume_from, self.fingerprint)
        self.events.emit(
            StartedMessage(
                total_steps=self.total_steps,
                n_train_examples=len(self.train_examples),
                truncated_examples=train_data.truncated,
            )
        )

        self.method = get_method(self.hp.training_type)
        base = load_model(self.spec.base_model_path, self.device, **self.method.load_options(self.device))
        self.model = self.method.prepare(base, self.hp)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        n_trainable = count_parameters(self.trainable)
        n_total = count_parameters(self.model.parameters())
        self.events.log(
            f"{self.hp.training_type} on {self.device.device.type} ({self.device.dtype}): "
            f"{n_trainable:,} of {n_total:,} parameters trainable"
        )
        # No weight decay: as HF Trainer's default, and adapters start at zero anyway.
        self.optimizer = torch.optim.AdamW(self.trainable, lr=self.hp.learning_rate, weight_decay=0.0)
        self.scheduler = get_scheduler(
            "linear",
            self.optimizer,
            num_warmup_steps=math.ceil(self.hp.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.scaler = torch.amp.GradScaler(self.device.device.type, enabled=self.device.needs_grad_scaling)
        if self.resume_from:
            restore_state(
                self.resume_from,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
            )
            self.events.log(
                f"resumed from step {self.progress.step} of {self.total_steps} ({self.resume_from})"
            )
        self.last_checkpoint_step = self.progress.step

    def _load(self, path: str, name: str) -> Dataset:
        data = load_dataset(path, self.spec.data_format, self.tokenizer, self.hp.max_seq_length)
        if data.truncated:
            self.events.log(
                f"{data.truncated} {name} examples exceed max_seq_length={self.hp.max_seq_length} "
                "and were truncated at the end",
                level="warn",
            )
        if data.dropped:
            self.events.log(f"{data.dropped} {name} examples have no trained token left; dropped", "warn")
        return data

    def fit(self) -> bool:
        """Train for n_epochs, from the checkpoint's step when resuming; False when the stop file ended
        training early."""
        examples, valid, batch_size = self.train_examples, self.valid_examples, self.hp.batch_size
        progress = self.progress
        eval_every = max(1, self.total_steps // 10)
        started = time.monotonic() - progress.elapsed_seconds
        first_epoch, first_batch = progress.epoch, progress.batches_done
        self.model.train()  # from_pretrained hands the model over in eval mode
        for epoch in range(first_epoch, self.hp.n_epochs):
            # One generator per epoch: any epoch's order can be rebuilt on its own when resuming.
            generator = torch.Generator().manual_seed(self.spec.seed + epoch)
            order = torch.randperm(len(examples), generator=generator).tolist()
            batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
            # A resumed epoch goes on after the batches its checkpoint had already trained.
            for index in range(first_batch if epoch == first_epoch else 0, len(batches)):
                if (request := self._stop_request()) is not None:
                    if request == "pause":
                        self._checkpoint()
                    self.events.emit(StoppedMessage(step=progress.step))
                    return False
                metrics = self._train_step([examples[i] for i in batches[index]])
                progress.step += 1
                progress.epoch, progress.batches_done = epoch, index + 1
                step, epoch_end = progress.step, index + 1 == len(batches)
                if valid and (step % eval_every == 0 or step == self.total_steps):
                    metrics.update(self._validate(self._next_valid_batch(valid), "valid"))
                if valid and epoch_end:
                    progress.last_full_valid = self._validate(valid, "full_valid")
                    metrics.update(progress.last_full_valid)
                progress.history.append((step, metrics))
                progress.elapsed_seconds = time.monotonic() - started
                self.events.emit(
                    MetricsMessage(
                        step=step,
                        total_steps=self.total_steps,
                        metrics=metrics,
                        elapsed_seconds=progress.elapsed_seconds,
                    )
                )
                every = self.spec.checkpoint_every_steps
                if epoch_end or (every > 0 and step % every == 0):
                    self._checkpoint()
        return True

    def _stop_request(self) -> str | None:
        """The stop file's content when it exists: "pause" asks for a checkpoint first."""
        try:
            return Path(self.spec.stop_file).read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            return None

    def _train_step(self, examples: list[Example]) -> Metrics:
        batch = self._collate(examples)
        loss_sum, correct, n_tokens = token_stats(self.model, batch)
        loss = loss_sum / n_tokens
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(self.trainable, MAX_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.trained_tokens += int(batch["attention_mask"].sum())
        return {"train_loss": loss.item(), "train_mean_token_accuracy": correct / n_tokens}

    def _next_valid_batch(self, examples: list[Example]) -> list[Example]:
        """batch_size validation examples, rotating through the set so successive evals see new data."""
        size = min(self.hp.batch_size, len(examples))
        cursor = self.progress.valid_cursor
        batch = [examples[(cursor + k) % len(examples)] for k in range(size)]
        self.progress.valid_cursor = (cursor + size) % len(examples)
        return batch

    @torch.no_grad()
    def _validate(self, examples: list[Example], prefix: str) -> Metrics:
        """Token-weighted loss and accuracy over `examples`, in batch_size chunks, without dropout."""
        self.model.eval()
        size = self.hp.batch_size
        chunks = [examples[i : i + size] for i in range(0, len(examples), size)]
        stats = [token_stats(self.model, self._collate(chunk)) for chunk in chunks]
        self.model.train()
        loss_sum = sum(loss.item() for loss, _, _ in stats)
        correct = sum(correct for _, correct, _ in stats)
        n_tokens = sum(n_tokens for _, _, n_tokens in stats)
        return {f"{prefix}_loss": loss_sum / n_tokens, f"{prefix}_mean_token_accuracy": correct / n_tokens}

    def _collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        batch = collate(examples, self.tokenizer.pad_token_id)
        return {name: tensor.to(self.device.device) for name, tensor in batch.items()}

    def _checkpoint(self) -> None:
        """Save and report a checkpoint of the current step, unless that step has one already: an epoch end
        on the interval, a pause right after either, or a pause before the first step of this attempt
        (nothing trained yet, or the checkpoint it resumed from)."""
        step = self.progress.step
        if step == self.last_checkpoint_step:
            return
        path = self.output_dir / "checkpoints" / f"step-{step}"
        save_checkpoint(
            path,
            method=self.method,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            progress=self.progress,
            fingerprint=self.fingerprint,
        )
        self.last_checkpoint_step = step
        self.events.emit(CheckpointMessage(step=step, path=str(path), metrics=self.progress.history[-1][1]))

    def save(self) -> None:
        """Publish the final artifact (what the method saves: an adapter, the trained tensors or the whole
        model) with the tokenizer (it carries the chat template) and the results CSV."""
        adapter_dir = self.output_dir / "adapter"
        self.method.save(self.model, adapter_dir)
        self.tokenizer.save_pretrained(adapter_dir)
        results_csv = self.output_dir / "step_metrics.csv"
        self._write_csv(results_csv)

        last_step, last_metrics = self.progress.history[-1]
        self.events.emit(
            CompletedMessage(
                step=last_step,
                adapter_path=str(adapter_dir),
                results_csv=str(results_csv),
                trained_tokens=self.progress.trained_tokens,
                metrics={**self.progress.last_full_valid, **last_metrics},
            )
        )

    def _write_csv(self, path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(CSV_HEADER)
            for step, metrics in self.progress.history:
                values = (metrics.get(name) for name in CSV_METRICS)
                writer.writerow([step, *("" if value is None else f"{value:.5f}" for value in values)])


def run(spec: TrainingSpec, events: EventWriter) -> None:
    recipe = SFTRecipe(spec, events)
    recipe.setup()
    if recipe.fit():
        recipe.save()
