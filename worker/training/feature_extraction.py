"""Feature extraction (training_type "feature_extraction", classification only): the base stays frozen and
embeds every text as the mean of its last hidden states over the real tokens; a scikit-learn logistic
regression fit on the training embeddings is the classifier. No gradient step, so the job is one "step".

Events, as the recipe's: StartedMessage(total_steps=1); with a validation file, a baseline evaluation
(step 0), then the head's evaluation (step 1); MetricsMessage(step=1) with the training log loss and
accuracy (and the full_valid_* metrics); CompletedMessage. The baseline is a majority-class predictor
(scikit-learn's `DummyClassifier(strategy="prior")`: the most frequent training label, with the training
label frequencies as probabilities), since the untouched base has no head to evaluate: it is what knowing
only the label counts achieves.

The artifact holds no pickle: `head.safetensors` (the regression's `coef` and `intercept`),
`feature_extraction.json` (base model, pooling, labels, max_seq_length), `labels.json` and the tokenizer.
`load_feature_extraction` rebuilds the classifier from it and the base. Jobs of this type take no
checkpoint and do not read the stop file: a stop or pause ends them by the runner's deadline, and a resumed
job fits again from the start (it costs one pass over the data).
"""

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from models.spec import (
    CompletedMessage,
    Details,
    EvaluationMessage,
    Metrics,
    MetricsMessage,
    StartedMessage,
    TrainingSpec,
)
from worker.training.device import DeviceConfig, describe, select_device
from worker.training.events import EventWriter
from worker.training.loading import load_model, load_tokenizer
from worker.training.metrics import classification_report
from worker.training.objectives.classification import Classification, Example, encode, pad, write_label_map
from worker.training.recipe import write_results_csv
from worker.training.tokens import pad_token_id

HEAD_FILE = "head.safetensors"
CONFIG_FILE = "feature_extraction.json"
MAX_ITER = 1000
"""scikit-learn's default of 100 lbfgs iterations can stop short on unscaled embeddings; the fit costs
little next to the embedding pass, so allow ten times that (and warn if even that is not enough)."""
LOAD_BATCH_SIZE = 32


@torch.no_grad()
def embed(
    model: PreTrainedModel, rows: Sequence[list[int]], pad_token_id: int, batch_size: int
) -> np.ndarray:
    """Mean of the last hidden states over each row's real tokens, batch by batch (right-padded: padding
    changes no real position's state), as float64 for scikit-learn."""
    pooled = []
    for start in range(0, len(rows), batch_size):
        input_ids, attention_mask = (
            t.to(model.device) for t in pad(rows[start : start + batch_size], pad_token_id)
        )
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled.append(((hidden * mask).sum(dim=1) / mask.sum(dim=1)).double().cpu())
    return torch.cat(pooled).numpy()


def head_probabilities(features: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """What `LogisticRegression.predict_proba` computes from its coefficients: a softmax over the class
    scores, or for two classes a sigmoid of the one score scikit-learn keeps (for the second class)."""
    scores = torch.from_numpy(features @ coef.T + intercept)
    if scores.shape[1] == 1:
        positive = torch.sigmoid(scores)
        return torch.cat([1 - positive, positive], dim=1).numpy()
    return scores.softmax(dim=1).numpy()


def score(probabilities: np.ndarray, y_true: list[int], labels: list[str]) -> tuple[Metrics, Details]:
    """The classification objective's full evaluation (loss, accuracy, macro F1) of class probabilities."""
    loss = log_loss(y_true, probabilities, labels=list(range(len(labels))))
    metrics, details = classification_report(y_true, probabilities.argmax(axis=1).tolist(), labels)
    return {"loss": float(loss), **metrics}, details


def run(spec: TrainingSpec, events: EventWriter) -> None:
    """Embed, fit the head, evaluate it against the majority-class baseline, and publish the artifact."""
    set_seed(spec.seed)
    started, hp, output_dir = time.monotonic(), spec.hyperparameters, Path(spec.output_dir)
    device = select_device()
    tokenizer = load_tokenizer(spec.base_model_path)
    objective = Classification(spec, tokenizer, device, events)  # for its examples: token ids, label ids
    train = objective.load_examples(spec.training_file, "training")
    valid = objective.load_examples(spec.validation_file, "validation") if spec.validation_file else []
    events.emit(
        StartedMessage(
            total_steps=1,
            n_train_examples=len(train),
            truncated_examples=objective.truncated,
            device=describe(device),
        )
    )

    model = load_model(spec.base_model_path, device, auto_class=AutoModel).eval()
    events.log(f"feature_extraction on {device.device.type}: a logistic regression on mean-pooled embeddings")

    def features(split: Sequence[Example]) -> np.ndarray:
        return embed(model, [example.input_ids for example in split], pad_token_id(tokenizer), hp.batch_size)

    def labels(split: Sequence[Example]) -> list[int]:
        return [example.label for example in split]

    x_train = features(train)
    head = LogisticRegression(max_iter=MAX_ITER, random_state=spec.seed).fit(x_train, labels(train))
    if head.n_iter_.max() >= MAX_ITER:
        events.log(f"the logistic regression did not converge in {MAX_ITER} iterations", level="warn")
    train_metrics, _ = score(head.predict_proba(x_train), labels(train), spec.labels)
    metrics = {"train_loss": train_metrics["loss"], "train_accuracy": train_metrics["accuracy"]}
    history: list[tuple[int, Metrics]] = []
    if valid:
        x_valid = features(valid)
        majority = DummyClassifier(strategy="prior").fit(x_train, labels(train))
        # scikit-learn is untyped: predict_proba's list return is for multi-output fits, not this one.
        probabilities = cast(np.ndarray, majority.predict_proba(x_valid))
        baseline, details = score(probabilities, labels(valid), spec.labels)
        history.append((0, full_valid(baseline)))
        events.emit(EvaluationMessage(step=0, baseline=True, metrics=history[0][1], details=details))
        evaluation, details = score(head.predict_proba(x_valid), labels(valid), spec.labels)
        events.emit(EvaluationMessage(step=1, metrics=full_valid(evaluation), details=details))
        metrics.update(full_valid(evaluation))
    history.append((1, metrics))
    events.emit(
        MetricsMessage(step=1, total_steps=1, metrics=metrics, elapsed_seconds=time.monotonic() - started)
    )

    adapter_dir = output_dir / "adapter"
    save_head(adapter_dir, spec, head)
    tokenizer.save_pretrained(adapter_dir)
    results_csv = output_dir / "step_metrics.csv"
    write_results_csv(results_csv, history, Classification.accuracy)
    events.emit(
        CompletedMessage(
            step=1,
            adapter_path=str(adapter_dir),
            results_csv=str(results_csv),
            trained_tokens=sum(example.length for example in train),
            metrics=metrics,
            elapsed_seconds=time.monotonic() - started,
        )
    )


def full_valid(metrics: Metrics) -> Metrics:
    return {f"full_valid_{name}": value for name, value in metrics.items()}


def save_head(directory: Path, spec: TrainingSpec, head: LogisticRegression) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"coef": torch.from_numpy(head.coef_), "intercept": torch.from_numpy(head.intercept_)}
    save_file(tensors, directory / HEAD_FILE, metadata={"format": "pt"})
    config = {
        "training_type": "feature_extraction",
        "base_model_name_or_path": spec.base_model_path,
        "pooling": "mean",
        "labels": spec.labels,
        "max_seq_length": spec.hyperparameters.max_seq_length,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    write_label_map(spec.labels, directory)


@dataclass
class FeatureClassifier:
    """A feature-extraction artifact on its base: texts are tokenized, cut and pooled as in training."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    labels: list[str]
    max_seq_length: int
    coef: np.ndarray
    intercept: np.ndarray

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        rows = [encode(self.tokenizer, text, self.max_seq_length)[0]["input_ids"] for text in texts]
        features = embed(self.model, rows, pad_token_id(self.tokenizer), LOAD_BATCH_SIZE)
        return head_probabilities(features, self.coef, self.intercept)

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.labels[index] for index in self.predict_proba(texts).argmax(axis=1)]


def load_feature_extraction(
    directory: Path, base_path: str, device: DeviceConfig | None = None
) -> FeatureClassifier:
    """The classifier a feature-extraction artifact describes, on the base at `base_path`."""
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    if config["training_type"] != "feature_extraction" or config["pooling"] != "mean":
        raise ValueError(f"{directory} does not hold a mean-pooled feature_extraction artifact")
    head = load_file(directory / HEAD_FILE)
    return FeatureClassifier(
        model=load_model(base_path, device or select_device(), auto_class=AutoModel).eval(),
        tokenizer=load_tokenizer(str(directory)),
        labels=config["labels"],
        max_seq_length=config["max_seq_length"],
        coef=head["coef"].numpy(),
        intercept=head["intercept"].numpy(),
    )
