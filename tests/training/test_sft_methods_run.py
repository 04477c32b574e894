"""Methods other than LoRA through the real child process (`python -m worker.training`): the whole model
(`full`), virtual tokens ahead of the input (`prompt_tuning`) and a 4-bit base (`qlora`). The three run at
once; their artifacts must reproduce the validation numbers the child reported."""

import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from models.spec import CheckpointMessage, CompletedMessage, LogMessage, MetricsMessage, TrainingSpec
from tests.tiny_model import build_tiny_llama
from tests.training.test_sft_run import Run, finish_child, make_spec, start_child, write_jsonl
from worker.training.data import collate, load_dataset
from worker.training.device import select_device
from worker.training.loading import load_model, load_tokenizer
from worker.training.methods import get_method
from worker.training.methods.qlora import keep_training_layout
from worker.training.objectives.causal_lm import token_stats

METHODS = ["full", "prompt_tuning", "qlora"]
N_TRAIN, N_VALID = 6, 3
STEPS = 3  # one epoch of batch size 2
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}


def method_spec(root: Path, training_type: str, base: Path, train: Path, valid: Path) -> TrainingSpec:
    spec = make_spec(root, training_type, base, train, valid)
    hp = spec.hyperparameters.model_copy(
        update={"training_type": training_type, "n_epochs": 1, "lora_dropout": 0.0, "num_virtual_tokens": 5}
    )
    spec = spec.model_copy(update={"hyperparameters": hp})
    (root / training_type / "spec.json").write_text(spec.model_dump_json())
    return spec


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("sft-methods")
    base = build_tiny_llama(root / "base")
    train = write_jsonl(root / "train.jsonl", N_TRAIN)
    valid = write_jsonl(root / "valid.jsonl", N_VALID, offset=100)
    specs = {name: method_spec(root, name, base, train, valid) for name in METHODS}
    children = {name: start_child(spec) for name, spec in specs.items()}
    return {name: finish_child(specs[name], *children[name]) for name in METHODS}


def trainable_counts(run: Run) -> tuple[int, int]:
    """The N and M of the child's "N of M parameters trainable" line."""
    [line] = [m.message for m in run.of_type(LogMessage) if "parameters trainable" in m.message]
    match = re.fullmatch(
        rf"{run.spec.hyperparameters.training_type} on \w+ \(torch\.\w+\): ([\d,]+) of "
        r"([\d,]+) parameters trainable",
        line,
    )
    assert match, line
    return int(match[1].replace(",", "")), int(match[2].replace(",", ""))


@pytest.mark.parametrize("name", METHODS)
def test_each_method_trains_and_publishes(runs: dict[str, Run], name: str) -> None:
    run = runs[name]
    [completed] = run.of_type(CompletedMessage)
    assert [m.step for m in run.of_type(MetricsMessage)] == list(range(1, STEPS + 1))
    assert [c.step for c in run.of_type(CheckpointMessage)] == [STEPS]
    files = {path.name for path in Path(completed.adapter_path).iterdir()}
    assert {"tokenizer.json", "chat_template.jinja"} <= files
    assert not {f for f in files if Path(f).suffix in PICKLE_SUFFIXES}
    expected = {"model.safetensors", "config.json"} if name == "full" else {"adapter_model.safetensors"}
    assert expected <= files


def test_the_log_counts_what_each_method_trains(runs: dict[str, Run]) -> None:
    base = AutoModelForCausalLM.from_pretrained(runs["full"].spec.base_model_path)
    n_base = sum(p.numel() for p in base.parameters())
    config = base.config
    hidden, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    # LoRA r=8 on all seven linear layers of each block, r * (in + out) each: q, o; k, v; gate, up, down.
    lora = (
        config.num_hidden_layers
        * 8
        * (4 * hidden + 2 * (hidden + kv) + 3 * (hidden + config.intermediate_size))
    )
    assert trainable_counts(runs["full"]) == (n_base, n_base)
    assert trainable_counts(runs["prompt_tuning"]) == (5 * hidden, n_base + 5 * hidden)
    assert trainable_counts(runs["qlora"]) == (lora, n_base + lora)


@pytest.mark.parametrize("name", METHODS)
def test_the_artifact_reproduces_the_reported_validation(runs: dict[str, Run], name: str) -> None:
    run = runs[name]
    [completed] = run.of_type(CompletedMessage)
    artifact = completed.adapter_path
    if name == "full":
        model = AutoModelForCausalLM.from_pretrained(artifact)
    else:
        method, device = get_method(name), select_device()
        base = load_model(run.spec.base_model_path, device, **method.load_options(device))
        if name == "qlora":
            keep_training_layout(base)  # the tiny model is too narrow for bitsandbytes' CPU inference layout
        model = PeftModel.from_pretrained(base, artifact)
    tokenizer = load_tokenizer(artifact)
    batch = collate(
        load_dataset(run.spec.validation_file, "chat", tokenizer, 128).examples, tokenizer.pad_token_id
    )
    with torch.no_grad():
        loss_sum, correct, n_tokens = token_stats(model.eval(), batch)
    assert loss_sum.item() / n_tokens == pytest.approx(completed.metrics["full_valid_loss"], rel=1e-5)
    assert correct / n_tokens == completed.metrics["full_valid_mean_token_accuracy"]
