"""The training recipe: setup → baseline evaluation → fit (steps, evaluations, checkpoints) → save.

One loop for every objective (`objectives/`) and every method (`methods/`). A plain loop rather than HF
Trainer, so every piece of state (data order, optimizer, scheduler, RNG, early-stopping patience) is ours
to checkpoint and resume exactly.
"""

import csv
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, get_scheduler, set_seed

from models.spec import (
    METHODS,
    CheckpointMessage,
    CompletedMessage,
    DataError,
    EvaluationMessage,
    LearningRateMessage,
    Metrics,
    MetricsMessage,
    StartedMessage,
    StoppedMessage,
    TrainingSpec,
    greater_is_better,
)
from worker.training import distributed, lr_range
from worker.training.batching import epoch_batches
from worker.training.checkpoint import (
    Progress,
    job_fingerprint,
    load_trained_weights,
    read_progress,
    restore_state,
    save_checkpoint,
)
from worker.training.device import describe, select_device
from worker.training.events import EventWriter
from worker.training.export import export_merged
from worker.training.loading import count_parameters, find_blocks, load_tokenizer
from worker.training.methods import continue_adapter, get_method, merged_into, untouched
from worker.training.objectives import Example, get_objective

EXPORT_PROMPTS = 8
"""Rows a merged export is verified on: enough to cover varied inputs, few enough to cost seconds."""
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
CSV_HEADER = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
"""OpenAI's results-file columns; the objective's other metrics follow in columns of their own names."""


class Recipe:
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
        self.device = select_device(trains_base_weights=METHODS[self.hp.training_type].trains_base_weights)
        self.tokenizer = load_tokenizer(self.spec.base_model_path)
        self.objective = get_objective(self.spec.objective)(
            self.spec, self.tokenizer, self.device, self.events
        )
        self.train_examples = self.objective.load_examples(self.spec.training_file, "training")
        valid_file = self.spec.validation_file
        self.valid_examples = self.objective.load_examples(valid_file, "validation") if valid_file else []
        check_training_examples(self.train_examples, self.spec.max_training_tokens)

        hp = self.hp
        self.micro_batches = math.ceil(len(self.train_examples) / hp.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_batches / hp.gradient_accumulation_steps)
        self.total_steps = hp.n_epochs * self.steps_per_epoch
        self.fingerprint = job_fingerprint(self.spec, len(self.train_examples), len(self.valid_examples))
        if self.resume_from:
            # Before the model loads: a checkpoint of another job fails the attempt at once.
            self.progress = read_progress(self.resume_from, self.fingerprint)
        self.events.emit(
            StartedMessage(
                total_steps=self.total_steps,
                n_train_examples=len(self.train_examples),
                truncated_examples=self.objective.truncated,
                device=describe(self.device),
            )
        )

        self.method = get_method(hp.training_type)
        base = self.objective.load_model(**self.method.load_options(self.device))
        start = self.spec.start_from
        if start is not None and start.mode == "merge":
            base = merged_into(base, Path(start.path))
        self.model = self.method.prepare(base, hp)
        if start is not None and start.mode == "continue":
            continue_adapter(self.model, Path(start.path))
        if hp.gradient_checkpointing:
            # Non-reentrant checkpointing needs no requires-grad hook on frozen embeddings (adapters).
            # nn.Module types attributes as tensors or modules; transformers models (and PEFT's) have this.
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # pyright: ignore[reportCallIssue]
        if METHODS[hp.training_type].parallel == "fsdp":
            distributed.shard(self.model, transformer_blocks(base))
        # After sharding: FSDP2 replaces every parameter with its shard.
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.events.log(
            f"{hp.training_type} on {self.device.device.type} ({self.device.dtype}): "
            f"{count_parameters(self.trainable):,} of {count_parameters(self.model.parameters()):,} "
            "parameters trainable"
        )
        # Before the range test, which trains: DPO's reference log-probabilities are the untouched model's.
        self.objective.before_training(self.model, self.train_examples)
        if hp.learning_rate_search and not self.resume_from:
            self._find_learning_rate()
            hp = self.hp
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=hp.learning_rate)
        self.scheduler = get_scheduler(
            SCHEDULERS[hp.lr_scheduler],
            self.optimizer,
            num_warmup_steps=math.ceil(hp.warmup_ratio * self.total_steps),
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

    def _find_learning_rate(self) -> None:
        """Resolve learning_rate_multiplier "auto" by a range test (worker/training/lr_range.py) and report
        it; the method's default stays when the job is too short to afford one. Every rank computes the
        same curve (each step's loss is summed across ranks), so every rank picks the same rate."""
        hp, base = self.hp, METHODS[self.hp.training_type].base_learning_rate
        planned, per_step = (
            hp.n_epochs * len(self.train_examples),
            hp.batch_size * hp.gradient_accumulation_steps,
        )
        budget, curve = lr_range.budget(planned, per_step), lr_range.Curve()
        steps = examples = 0
        if self.spec.objective == "grpo":
            rate, reason = None, "a reinforcement loss is a policy-gradient surrogate, not a measure of fit"
        elif not lr_range.affordable_steps(planned, per_step):
            rate = None
            reason = (
                f"{lr_range.COST_SHARE:.0%} of the job's {planned} training examples makes {budget} test "
                f"steps of {per_step}, fewer than the {lr_range.MIN_STEPS} a test needs"
            )
        else:
            steps, examples = self._range_test(lr_range.rates(base, budget), curve)
            rate, reason = curve.pick()
        # Three significant digits: the echoed multiplier, sent back, asks for the same rate.
        multiplier = float(f"{rate / base:.3g}") if rate is not None else hp.learning_rate_multiplier
        self.hp = hp.with_learning_rate(base * multiplier, multiplier)
        # A resumed attempt's spec carries what was found: its checkpoints' fingerprint must match.
        self.spec = self.spec.model_copy(update={"hyperparameters": self.hp})
        self.fingerprint = job_fingerprint(self.spec, len(self.train_examples), len(self.valid_examples))
        self.events.emit(
            LearningRateMessage(
                learning_rate=self.hp.learning_rate,
                learning_rate_multiplier=multiplier,
                found=rate is not None,
                reason=reason,
                steps=steps,
                examples=examples,
                budget_steps=budget,
                planned_examples=planned,
                total_steps=self.total_steps,
                rates=curve.rates,
                losses=curve.losses,
                diverged_at=curve.diverged_at,
            )
        )

    def _range_test(self, rates: list[float], curve: lr_range.Curve) -> tuple[int, int]:
        """Train one step of the first epoch's batches at each rate until the loss diverges, then put back
        the trained weights, the RNG state and the token count: training starts from the same model, in
        the same random state, as without the test (setup builds its optimizer, scheduler and scaler
        afterwards; the test's are thrown away). Returns the steps run and the examples they processed."""
        saved = [parameter.detach().clone() for parameter in self.trainable]
        trained_tokens = self.progress.trained_tokens
        order = self._epoch_steps(0)
        steps = examples = 0
        cuda = [self.device.device] if self.device.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            self.optimizer = torch.optim.AdamW(self._param_groups(), lr=rates[0])
            # The scheduler sets each step's rate: the recipe's step advances it after the update.
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda step: rates[min(step, len(rates) - 1)] / rates[0]
            )
            self.scaler = torch.amp.GradScaler(
                self.device.device.type, enabled=self.device.needs_grad_scaling
            )
            self.model.train()
            for rate in rates:
                batches = [[self.train_examples[i] for i in batch] for batch in order[steps % len(order)]]
                loss = self._train_step(batches)["train_loss"]
                steps, examples = steps + 1, examples + sum(map(len, batches))
                if not curve.add(rate, loss):
                    break
        with torch.no_grad():
            for parameter, value in zip(self.trainable, saved, strict=True):
                parameter.copy_(value)
        self.progress.trained_tokens = trained_tokens
        return steps, examples

    def _epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        """An epoch's optimizer steps, each a list of batches (gradient accumulation) of example indices."""
        hp = self.hp
        batches = epoch_batches(
            [example.length for example in self.train_examples],
            hp.batch_size,
            seed=self.spec.seed + epoch,
            group_by_length=hp.group_by_length,
        )
        return [
            batches[i : i + hp.gradient_accumulation_steps]
            for i in range(0, len(batches), hp.gradient_accumulation_steps)
        ]

    def _param_groups(self) -> list[dict[str, object]]:
        """Weight decay on matrices only: decaying biases and norm scales only hurts (as HF Trainer does)."""
        decay = [p for p in self.trainable if p.ndim >= 2]
        no_decay = [p for p in self.trainable if p.ndim < 2]
        return [
            {"params": decay, "weight_decay": self.hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def baseline(self) -> None:
        """Evaluate the untouched base on the validation file before the first step, with the metrics
        every checkpoint will report, so the job can show what tuning gained. Adapters are switched off
        (a learned prompt changes outputs from the start); other methods start as the base."""
        if not self.valid_examples or self.progress.step > 0:
            return
        with untouched(self.model) as base:
            metrics, details = self._evaluate(base)
        self.progress.history.append((0, metrics))
        self.events.emit(EvaluationMessage(step=0, baseline=True, metrics=metrics, details=details))

    def fit(self) -> bool:
        """Train for n_epochs, from the checkpoint's step when resuming; False when the stop file ended
        training early. Early stopping ends it early too, but what it trained is published."""
        hp, progress = self.hp, self.progress
        eval_every = max(1, self.total_steps // 10)
        started = time.monotonic() - progress.elapsed_seconds
        first_epoch, first_batch = progress.epoch, progress.batches_done
        self.model.train()  # from_pretrained hands the model over in eval mode
        for epoch in range(first_epoch, hp.n_epochs):
            steps = self._epoch_steps(epoch)
            n_batches = sum(map(len, steps))
            # A resumed epoch goes on after the batches its checkpoint had already trained.
            done = first_batch if epoch == first_epoch else 0
            # `done` ends on a step: a multiple of the accumulation, or the epoch's last (shorter) step.
            for index in range(math.ceil(done / hp.gradient_accumulation_steps), len(steps)):
                if (request := distributed.agree_on_stop(self._stop_request())) is not None:
                    if request == "pause":
                        self._checkpoint()
                    self.events.emit(StoppedMessage(step=progress.step))
                    return False
                metrics = self._train_step(
                    [[self.train_examples[i] for i in batch] for batch in steps[index]]
                )
                progress.step += 1
                progress.epoch = epoch
                progress.batches_done = min(n_batches, (index + 1) * hp.gradient_accumulation_steps)
                step, epoch_end = progress.step, index + 1 == len(steps)
                if self.valid_examples and (step % eval_every == 0 or step == self.total_steps):
                    metrics.update(self._validate_batch())
                interval = hp.eval_steps or hp.eval_interval  # eval_interval: reinforcement's name
                evaluate = epoch_end or (interval > 0 and step % interval == 0)
                if self.valid_examples and evaluate:
                    full, details = self._evaluate()
                    progress.last_full_valid = full
                    metrics.update(full)
                    self.events.emit(EvaluationMessage(step=step, metrics=full, details=details))
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
                # Before the checkpoint, which saves the best so far with it.
                stop_early = bool(self.valid_examples) and evaluate and self._patience_ran_out(metrics)
                every = self.spec.checkpoint_every_steps
                if evaluate or (every > 0 and step % every == 0):
                    self._checkpoint()
                if stop_early:
                    self.events.log(
                        f"early stopping at step {step}: {hp.metric_for_best_checkpoint} has not improved "
                        f"for {hp.early_stopping_patience} evaluations"
                    )
                    return True
        return True

    def _patience_ran_out(self, metrics: Metrics) -> bool:
        """Track the best value of the chosen metric; True once patience evaluations passed without it."""
        progress, name = self.progress, self.hp.metric_for_best_checkpoint
        value = metrics[name]
        better = greater_is_better(name)
        if progress.best_value is None or (
            value > progress.best_value if better else value < progress.best_value
        ):
            progress.best_value, progress.evaluations_since_best = value, 0
            progress.best_step = progress.step
            return False
        progress.evaluations_since_best += 1
        patience = self.hp.early_stopping_patience
        return patience > 0 and progress.evaluations_since_best >= patience

    def _stop_request(self) -> str | None:
        """The stop file's content when it exists: "pause" asks for a checkpoint first. Rank 0 reads it
        and tells the others (`distributed.agree_on_stop`)."""
        if not distributed.is_main():
            return None
        try:
            return Path(self.spec.stop_file).read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            return None

    def _train_step(self, batches: list[list[Example]]) -> Metrics:
        """One optimizer step over `batches` (gradient accumulation): the loss is averaged over the units
        of the whole step, exactly as one large batch would average it. With several ranks each trains
        its share of every batch and the gradients are summed: the same step, whatever the world size."""
        units = sum(example.units for batch in batches for example in batch)
        sharded = distributed.is_sharded(self.model)
        scale = distributed.gradient_scale(self.model)
        loss_total, correct, tokens = 0.0, 0, 0
        for batch in batches:
            if (mine := self._share(batch)) is None:
                continue  # fewer examples than ranks: this rank adds zero gradients
            share, weight = mine
            with self.device.autocast():
                stats = self.objective.batch_stats(self.model, share)
            loss = stats.loss_sum * weight / units
            self.scaler.scale(loss * scale).backward()
            loss_total += loss.item()
            correct += stats.correct * int(weight)
            tokens += stats.tokens * int(weight)
        if not sharded:  # FSDP2 reduced the gradients in backward
            distributed.sum_gradients(self.trainable)
        loss_total, correct, tokens = distributed.sum_across([loss_total, correct, tokens])
        self.progress.trained_tokens += int(tokens)
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(self.trainable, self.hp.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"train_loss": loss_total, f"train_{self.objective.accuracy}": correct / units}

    def _share(self, batch: list[Example]) -> tuple[list[Example], float] | None:
        """This rank's share of a batch and the weight of its results: None when it has no example (fewer
        than ranks), except that every rank of a sharded model takes part in each forward and backward
        (they gather and reduce its weights together): such a rank runs one example at weight 0."""
        if share := distributed.share(batch):
            return share, 1.0
        return (batch[:1], 0.0) if distributed.is_sharded(self.model) else None

    def _validate_batch(self) -> Metrics:
        """Loss and accuracy on the next batch_size validation examples, rotating through the set so
        successive steps see new data; each rank scores its share and the sums are reduced."""
        examples = self.valid_examples
        size = min(self.hp.batch_size, len(examples))
        cursor = self.progress.valid_cursor
        batch = [examples[(cursor + k) % len(examples)] for k in range(size)]
        self.progress.valid_cursor = (cursor + size) % len(examples)
        loss_sum, correct = 0.0, 0.0
        if (mine := self._share(batch)) is not None:
            share, weight = mine
            self.model.eval()
            with torch.no_grad(), self.device.autocast():
                stats = self.objective.batch_stats(self.model, share)
            self.model.train()
            loss_sum, correct = stats.loss_sum.item() * weight, stats.correct * weight
        loss_sum, correct = distributed.sum_across([loss_sum, correct])
        units = sum(example.units for example in batch)
        return {"valid_loss": loss_sum / units, f"valid_{self.objective.accuracy}": correct / units}

    def _evaluate(self, model: nn.Module | None = None) -> tuple[Metrics, dict[str, object]]:
        """The objective's full evaluation of `model` (the model being trained unless given), without
        dropout or grad."""
        self.model.eval()
        with torch.no_grad(), self.device.autocast():
            metrics, details = self.objective.evaluate(model or self.model, self.valid_examples)
        self.model.train()
        return {f"full_valid_{name}": value for name, value in metrics.items()}, details

    def _checkpoint(self) -> None:
        """Save and report a checkpoint of the current step, unless that step has one already: an epoch end
        on the interval, a pause right after either, or a pause before the first step of this attempt
        (nothing trained yet, or the checkpoint it resumed from)."""
        step = self.progress.step
        if step == self.last_checkpoint_step:
            return
        self.last_checkpoint_step = step
        path = self.output_dir / "checkpoints" / f"step-{step}"

        def extras(directory: Path) -> None:
            self.tokenizer.save_pretrained(directory)  # every checkpoint is servable with its chat template
            self.objective.save_extras(directory)

        # Every rank: a sharded model's state is written by all, a replicated one's by rank 0 alone.
        save_checkpoint(
            path,
            method=self.method,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            progress=self.progress,
            fingerprint=self.fingerprint,
            extras=extras,
        )
        self.events.emit(CheckpointMessage(step=step, path=str(path), metrics=self.progress.history[-1][1]))

    def _best_weights(self) -> tuple[int, Metrics] | None:
        """With publish_best, put the best checkpoint's weights back into the model when that is not the
        last step, and return its step and metrics (None: the last step is published)."""
        best, last = self.progress.best_step, self.progress.history[-1][0]
        if not self.spec.publish_best or best is None or best == last:
            return None
        local = self.output_dir / "checkpoints" / f"step-{best}"
        earlier = Path(self.spec.best_checkpoint) if self.spec.best_checkpoint else None
        directory = local if local.exists() else earlier
        if directory is None or directory.name != f"step-{best}":
            raise RuntimeError(f"the best checkpoint, step {best}, is not available to publish")
        load_trained_weights(directory, self.model)
        metrics = next(metrics for step, metrics in self.progress.history if step == best)
        self.events.log(
            f"publishing the best checkpoint, step {best} of {last} by {self.hp.metric_for_best_checkpoint}"
        )
        return best, metrics

    def save(self) -> None:
        """Publish the final artifact (what the method saves: an adapter, the trained tensors or the whole
        model; of the best checkpoint with publish_best) with the tokenizer (it carries the chat template),
        the objective's extras and the results CSV. Every rank calls it (a sharded model is gathered whole
        for the save); rank 0 publishes."""
        best = self._best_weights()
        adapter_dir = self.output_dir / "adapter"
        whole = distributed.whole_state(self.model)
        if not distributed.is_main():
            return
        self.method.save(self.model, adapter_dir, whole)
        self.tokenizer.save_pretrained(adapter_dir)
        self.objective.save_extras(adapter_dir)
        merged_dir = self._export_merged() if self.spec.export_merged else None
        results_csv = self.output_dir / "step_metrics.csv"
        write_results_csv(results_csv, self.progress.history, self.objective.accuracy)

        last_step, last_metrics = self.progress.history[-1]
        self.events.emit(
            CompletedMessage(
                step=last_step,
                adapter_path=str(adapter_dir),
                merged_path=str(merged_dir) if merged_dir else None,
                results_csv=str(results_csv),
                trained_tokens=self.progress.trained_tokens,
                metrics=best[1] if best else {**self.progress.last_full_valid, **last_metrics},
                published_step=best[0] if best else None,
                elapsed_seconds=self.progress.elapsed_seconds,
            )
        )

    def _export_merged(self) -> Path:
        """The adapter merged into a fresh copy of the base, verified on up to EXPORT_PROMPTS held-out rows
        (training rows without a validation file); a mismatch raises and fails the job."""
        rows = (self.valid_examples or self.train_examples)[:EXPORT_PROMPTS]
        prompts = [row.input_ids for row in rows]
        report = export_merged(
            self.model,
            self.hp.training_type,
            self.objective.load_model,
            self.tokenizer,
            prompts,
            self.output_dir / "merged",
            extras=self.objective.save_extras,
        )
        self.events.log(report.summary())
        return report.directory


def transformer_blocks(model: PreTrainedModel) -> list[nn.Module]:
    """FSDP2's units besides the root: the transformer blocks, or none (one unit, the whole model) when
    they are ambiguous."""
    try:
        return list(find_blocks(model)[1])
    except ValueError:
        return []


def check_training_examples(examples: Sequence[Example], max_tokens: int | None) -> None:
    """What a job refuses once its training file is tokenized: no example left to train on (a ValueError),
    or more tokens than the service takes (`settings.max_file_tokens`)."""
    if not examples:
        raise ValueError("no training example has anything left to train on")
    tokens = sum(example.length for example in examples)
    if max_tokens is not None and tokens > max_tokens:
        raise DataError(
            "invalid_n_tokens",
            f"Training file has {tokens} tokens with this model's tokenizer, over the limit of {max_tokens}.",
            "training_file",
        )


def write_results_csv(path: Path, history: Sequence[tuple[int, Metrics]], accuracy: str) -> None:
    """OpenAI's columns first, then every other metric the job reported; step 0 holds the baseline
    evaluation. The two accuracy columns hold the objective's own accuracy (token accuracy for language
    modelling, accuracy for classifiers, reward accuracy for preferences)."""
    standard = ["train_loss", f"train_{accuracy}", "valid_loss", f"valid_{accuracy}"]
    extra = sorted({name for _, metrics in history for name in metrics} - set(standard))
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow([*CSV_HEADER, *extra])
        for step, metrics in history:
            values = (metrics.get(name) for name in [*standard, *extra])
            writer.writerow([step, *("" if value is None else f"{value:.5f}" for value in values)])


def run(spec: TrainingSpec, events: EventWriter) -> None:
    recipe = Recipe(spec, events)
    recipe.setup()
    recipe.baseline()
    # Each evaluation's batches are shared out among the ranks and every rank gathers all the scores
    # (`distributed.map_batches`): the same metrics everywhere, so early stopping agrees; only rank 0
    # reports them and publishes.
    if recipe.fit():
        recipe.save()
