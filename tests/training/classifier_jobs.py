"""Shared by the classifier tests: tiny separable data, specs, a recorder of the child's events, one
training method trained a few real steps through an objective (ready to compare with its reloaded
artifact), and a fixture that keeps torch on one thread.
"""

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, PreTrainedModel

from models.spec import VIRTUAL_TOKEN_METHODS, ChildMessage, TrainingSpec
from worker.training.device import select_device
from worker.training.events import EventWriter
from worker.training.loading import load_tokenizer
from worker.training.methods import Method, get_method
from worker.training.methods.bitfit import load_bitfit
from worker.training.methods.freeze import load_freeze
from worker.training.methods.qlora import keep_training_layout, unquantize_new_head
from worker.training.objectives import Objective, get_objective
from worker.training.recipe import run

T = TypeVar("T")
DEVICE = select_device()
FRUIT = "apple banana cherry grape lemon mango orange peach pear plum".split()
ANIMAL = "bird cat cow dog duck fish fox horse lion mouse owl pig".split()
FILLER = "the a on is near with and".split()
NER_TAGS = ["B-ANI", "B-FRU", "I-ANI", "O"]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt", ".joblib"}
ADAPTER_PART = {
    "lora": "lora_",
    "dora": "lora_",
    "qlora": "lora_",
    "ia3": "ia3_l",
    "prompt_tuning": "prompt_encoder",
    "p_tuning": "prompt_encoder",
    "prefix_tuning": "prompt_encoder",
}


class Recorder(EventWriter):
    """Keeps the events the recipe would send to the runner."""

    def __init__(self) -> None:
        super().__init__(os.open(os.devnull, os.O_WRONLY))
        self.messages: list[ChildMessage] = []

    def emit(self, message: ChildMessage) -> None:
        super().emit(message)
        self.messages.append(message)

    def of_type(self, cls: type[T]) -> list[T]:
        return [message for message in self.messages if isinstance(message, cls)]


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def texts(count: int, seed: int) -> list[dict[str, Any]]:
    """Alternating "fruit" and "animal" texts of three words from disjoint vocabularies: separable."""
    rng = random.Random(seed)
    labels = ["fruit", "animal"]
    return [
        {"text": " ".join(rng.sample(FRUIT if i % 2 == 0 else ANIMAL, 3)), "label": labels[i % 2]}
        for i in range(count)
    ]


def sentences(count: int, seed: int) -> list[dict[str, Any]]:
    """Words tagged B-FRU (a fruit), B-ANI I-ANI (two animals in a row) or O (filler)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        tokens: list[str] = []
        tags: list[str] = []
        for _ in range(4):
            kind = rng.random()
            if kind < 0.3:
                tokens, tags = [*tokens, rng.choice(FRUIT)], [*tags, "B-FRU"]
            elif kind < 0.6:
                tokens, tags = [*tokens, rng.choice(ANIMAL), rng.choice(ANIMAL)], [*tags, "B-ANI", "I-ANI"]
            else:
                tokens, tags = [*tokens, rng.choice(FILLER)], [*tags, "O"]
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def job_spec(
    root: Path,
    base: Path,
    objective: str,
    labels: list[str],
    training_file: str,
    validation_file: str | None = None,
    **hyperparameters: Any,
) -> TrainingSpec:
    root.mkdir(parents=True, exist_ok=True)
    values = {
        "training_type": "full",
        "n_epochs": 1,
        "batch_size": 8,
        "learning_rate_multiplier": 1.0,
        "learning_rate": 3e-2,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": "all-linear",
        "max_seq_length": 32,
        "warmup_ratio": 0.0,
        "trainable_layers": 0,
        "num_virtual_tokens": 4,
    }
    return TrainingSpec.model_validate(
        {
            "job_id": f"ftjob-{root.name}",
            "base_model_path": str(base),
            "training_file": training_file,
            "validation_file": validation_file,
            "data_format": objective,
            "objective": objective,
            "labels": labels,
            "output_dir": str(root / "out"),
            "stop_file": str(root / "STOP"),
            "seed": 0,
            "hyperparameters": {**values, **hyperparameters},
        }
    )


def run_job(spec: TrainingSpec) -> Recorder:
    events = Recorder()
    run(spec, events)
    return events


def make_objective(spec: TrainingSpec, events: EventWriter | None = None) -> Objective:
    tokenizer = load_tokenizer(spec.base_model_path)
    return get_objective(spec.objective)(spec, tokenizer, DEVICE, events or Recorder())


@dataclass
class Trained:
    """One method prepared on a base with a new head, trained a few steps, and saved."""

    objective: Objective
    model: nn.Module
    base_names: set[str]
    changed_base: set[str]
    added: set[str]
    """Parameters the method added to the base (adapters, prompts, new biases, PEFT's head copies)."""
    unchanged_trainable: set[str]
    logits: Callable[[nn.Module], torch.Tensor]
    """The objective's logits of the training examples under a model, without grad."""
    base_logits: torch.Tensor
    tuned_logits: torch.Tensor
    artifact: Path


LogitsFn = Callable[[Any, nn.Module, Sequence[Any]], torch.Tensor]
"""How the objective computes a batch's logits: (objective, model, examples) -> logits."""


def train_method(spec: TrainingSpec, logits: LogitsFn, artifact: Path) -> Trained:
    """Train spec's method three steps on the whole training file (one batch) through the objective."""
    objective = make_objective(spec)
    examples = objective.load_examples(spec.training_file, "training")

    def logits_of(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return logits(objective, model, examples)

    method = get_method(spec.hyperparameters.training_type)
    torch.manual_seed(0)
    base = load_base(objective, method)
    base_logits = logits_of(base)
    before = {name: (p, p.detach().clone()) for name, p in base.named_parameters()}
    base_ids = {id(p) for p, _ in before.values()}

    model = method.prepare(base, spec.hyperparameters)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    trainable_before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=spec.hyperparameters.learning_rate)
    model.train()
    for _ in range(3):
        stats = objective.batch_stats(model, examples)
        (stats.loss_sum / stats.units).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    method.save(model, artifact)
    objective.save_extras(artifact)
    return Trained(
        objective=objective,
        model=model,
        base_names=set(before),
        changed_base={name for name, (p, old) in before.items() if not torch.equal(p.detach(), old)},
        added={name for name, p in model.named_parameters() if id(p) not in base_ids},
        unchanged_trainable={n for n, p in trainable.items() if torch.equal(p.detach(), trainable_before[n])},
        logits=logits_of,
        base_logits=base_logits,
        tuned_logits=logits_of(model),
        artifact=artifact,
    )


def reload(trained: Trained) -> nn.Module:
    """The saved artifact applied onto a fresh base, as the artifact's consumer would load it."""
    spec, artifact = trained.objective.spec, trained.artifact
    name = spec.hyperparameters.training_type
    method = get_method(name)
    if name == "full":
        auto_class = (
            AutoModelForSequenceClassification
            if spec.objective == "classification"
            else AutoModelForTokenClassification
        )
        return auto_class.from_pretrained(artifact).to(DEVICE.device).eval()
    base = load_base(trained.objective, method)
    if name == "freeze":
        return load_freeze(base, artifact)
    if name == "bitfit":
        return load_bitfit(base, artifact)
    return PeftModel.from_pretrained(base, artifact).eval()


def load_base(objective: Objective, method: Method) -> PreTrainedModel:
    """The base with the objective's head, loaded as the method loads it."""
    base = objective.load_model(**method.load_options(DEVICE)).eval()
    if method.name == "qlora":
        unquantize_new_head(base)
        keep_training_layout(base)  # the tiny models are too narrow for bitsandbytes' CPU inference layout
    return base


def expected_trainable(trained: Trained, kind: str, head: set[str]) -> tuple[set[str], set[str]]:
    """The base parameters the method should change, and the parameters it should add (its adapter's
    names carry ADAPTER_PART; PEFT trains copies of the head under `modules_to_save`)."""
    name, base = trained.objective.spec.hyperparameters.training_type, trained.base_names
    if name == "full":
        return base, set()
    if name == "freeze":  # trainable_layers=0: the head, and Llama's final norm
        return head | ({"model.norm.weight"} & base), set()
    if name == "bitfit":  # BERT's own biases (LayerNorm's too); Llama gets a zero bias on every linear layer
        biases = {n for n in base if n.endswith(".bias") and n not in head}
        return head | biases, set() if biases else linear_biases(trained)
    return set(), {n for n in trained.added if ADAPTER_PART[name] in n} | peft_head(trained, head)


def linear_biases(trained: Trained) -> set[str]:
    """The biases of Llama's attention and MLP projections (which bitfit adds)."""
    return {
        f"{name}.bias"
        for name, module in trained.model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("model.layers.")
    }


def peft_head(trained: Trained, head: set[str]) -> set[str]:
    """The names PEFT gives its trained copy of each head parameter (prompt methods wrap the model one level
    less deep than adapters)."""
    prompt = trained.objective.spec.hyperparameters.training_type in VIRTUAL_TOKEN_METHODS
    wrapper = "base_model." if prompt else "base_model.model."
    return {
        f"{wrapper}{module}.modules_to_save.default.{param}"
        for module, param in (name.rsplit(".", 1) for name in head)
    }


def files_of(artifact: Path) -> set[str]:
    files = {path.name for path in artifact.rglob("*")}
    assert not {name for name in files if Path(name).suffix in PICKLE_SUFFIXES}
    return files


def label_map(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "labels.json").read_text(encoding="utf-8"))
