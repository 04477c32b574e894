"""Artifacts made for real on the tiny models (random adapters that change the outputs, a freeze artifact,
a classifier), each published like training publishes: weights, tokenizer, lineage.json."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from httpx import Response
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from inference.app import create_app
from inference.engine import Engine
from models.inference import Target
from models.lineage import LINEAGE_FILE, BaseModelRef, FileRef, Lineage, tokenizer_hash
from models.registry import content_hash
from models.settings import Settings
from models.spec import ResolvedHyperparameters
from tests.tiny_model import build_tiny_bert, build_tiny_llama
from worker.training.data import tokenize_chat
from worker.training.loading import load_tokenizer
from worker.training.methods import get_method
from worker.training.methods._tensors import save_trained_tensors
from worker.training.objectives.classification import write_label_map

LABELS = ["negative", "positive"]
OTHER_TEMPLATE = (
    "{% for message in messages %}### {{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:{% endif %}"
)
MESSAGES = [
    {"role": "developer", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "What is the capital of Spain?"},
]


def write_lineage(directory: Path, base: Path, training_type: str, base_hash: str | None = None) -> None:
    """A lineage.json as training writes it; `base_hash`: claim another base."""
    lineage = Lineage(
        job_id="ftjob-test",
        base_model=BaseModelRef(name=base.name, content_hash=base_hash or content_hash(base)),
        tokenizer_hash=tokenizer_hash(directory),
        training_file=FileRef(id="file-test", sha256="0" * 64),
        validation_file=None,
        method={"type": "supervised"},
        objective="classification" if (directory / "labels.json").exists() else "sft",
        training_type=training_type,
        hyperparameters={"max_seq_length": 64},
        libraries={},
        step=1,
        metrics={},
    )
    (directory / LINEAGE_FILE).write_text(lineage.model_dump_json(), encoding="utf-8")


def publish(
    model: nn.Module, directory: Path, base: Path, training_type: str, labels: list[str] | None = None
) -> None:
    """What the recipe publishes: the method's artifact, the tokenizer, a classifier's labels, the lineage."""
    if training_type in ("freeze", "bitfit"):
        save_trained_tensors(training_type, model, directory)
    else:
        model.save_pretrained(directory)
    publish_extras(directory, base, training_type, labels)


def publish_extras(directory: Path, base: Path, training_type: str, labels: list[str] | None = None) -> None:
    load_tokenizer(str(base)).save_pretrained(directory)
    if labels is not None:
        write_label_map(labels, directory)
    write_lineage(directory, base, training_type)


def randomize(model: nn.Module, part: str, seed: int, std: float = 0.5) -> None:
    """Adapters start as the identity (lora_B = 0, ia3 = 1): move them so each changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if part in name:
                param.add_(torch.randn(param.shape, generator=generator) * std)


def fresh_llama(base: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(base).eval()


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("bases") / "tiny-llama")


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("bases") / "tiny-bert")


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory: pytest.TempPathFactory, base_dir: Path, bert_dir: Path) -> Path:
    """Every artifact the tests serve, under its artifact-store key."""
    root = tmp_path_factory.mktemp("data") / "artifacts"

    for key, seed in [("lora-a", 1), ("lora-b", 2), ("lora-c", 3)]:
        model = get_peft_model(fresh_llama(base_dir), LoraConfig(r=4, target_modules="all-linear"))
        randomize(model, "lora_B", seed)
        publish(model, root / key, base_dir, "lora")

    # Same weights as lora-a, but its tokenizer renders chats differently: serving must use that template.
    templated = get_peft_model(fresh_llama(base_dir), LoraConfig(r=4, target_modules="all-linear"))
    randomize(templated, "lora_B", 1)
    publish(templated, root / "lora-template", base_dir, "lora")
    tokenizer = load_tokenizer(str(base_dir))
    tokenizer.chat_template = OTHER_TEMPLATE
    tokenizer.save_pretrained(root / "lora-template")
    write_lineage(root / "lora-template", base_dir, "lora")

    ia3 = get_peft_model(fresh_llama(base_dir), IA3Config(task_type="CAUSAL_LM"))
    randomize(ia3, "ia3_l", 4)
    publish(ia3, root / "ia3", base_dir, "ia3")

    prompt = get_peft_model(
        fresh_llama(base_dir), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    randomize(prompt, "prompt_encoder", 9, std=1.0)
    publish(prompt, root / "prompt_tuning", base_dir, "prompt_tuning")

    full = fresh_llama(base_dir)
    randomize(full, "mlp.down_proj", 10, std=0.2)
    publish(full, root / "full", base_dir, "full")

    freeze = get_method("freeze").prepare(fresh_llama(base_dir), hyperparameters(trainable_layers=1))
    randomize(freeze, "layers.1.", 5, std=0.2)
    publish(freeze, root / "freeze", base_dir, "freeze")

    bitfit = get_method("bitfit").prepare(fresh_llama(base_dir), hyperparameters())
    randomize(bitfit, ".bias", 12, std=0.3)
    publish(bitfit, root / "bitfit", base_dir, "bitfit")

    # Other shapes, to be copied into slots other adapters left: a larger rank, fewer target modules, DoRA.
    # All with the service's default dropout: a slot left in training mode would apply it at inference.
    shapes = {
        "lora-r8": LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.05),
        "lora-qv": LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.05),
        "lora-d": LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.05),
        "dora": LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.05, use_dora=True),
    }
    for seed, (key, config) in enumerate(shapes.items(), start=13):
        model = get_peft_model(fresh_llama(base_dir), config)
        randomize(model, "lora_B", seed)
        publish(model, root / key, base_dir, "dora" if config.use_dora else "lora")

    # Trained on another base (its hash differs), and an artifact published without lineage.
    mismatch = root / "mismatch"
    publish(get_peft_model(fresh_llama(base_dir), LoraConfig(r=4)), mismatch, base_dir, "lora")
    write_lineage(mismatch, base_dir, "lora", base_hash="sha256:" + "f" * 64)
    unchecked = root / "no-lineage"
    publish(get_peft_model(fresh_llama(base_dir), LoraConfig(r=4)), unchecked, base_dir, "lora")
    (unchecked / LINEAGE_FILE).unlink()

    # A sentiment classifier: LoRA on the tiny BERT with a new two-label head (trained in full). Seeded:
    # the new head and lora_A start random, and the test needs its two inputs told apart.
    torch.manual_seed(0)
    bert = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=len(LABELS)).eval()
    config = LoraConfig(
        r=4, target_modules=["query", "value"], task_type="SEQ_CLS", modules_to_save=["classifier"]
    )
    classifier = get_peft_model(bert, config)
    randomize(classifier, "lora_B", 6)
    randomize(classifier, "classifier.modules_to_save", 7, std=2.0)
    publish(classifier, root / "classifier", bert_dir, "lora", LABELS)
    # A feature-extraction classifier: a logistic-regression head on the tiny BERT's mean-pooled states.
    extraction = root / "feature_extraction"
    extraction.mkdir()
    head = {
        "coef": torch.randn(1, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(11)) * 2,
        "intercept": torch.tensor([0.1], dtype=torch.float64),
    }
    save_file(head, extraction / "head.safetensors")
    config = {
        "training_type": "feature_extraction",
        "pooling": "mean",
        "labels": LABELS,
        "max_seq_length": 64,
    }
    (extraction / "feature_extraction.json").write_text(json.dumps(config), encoding="utf-8")
    publish_extras(extraction, bert_dir, "feature_extraction", LABELS)
    return root


def hyperparameters(**overrides: int) -> ResolvedHyperparameters:
    values = {
        "n_epochs": 1,
        "batch_size": 2,
        "learning_rate_multiplier": 1.0,
        "learning_rate": 1e-3,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": "all-linear",
        "max_seq_length": 64,
        "warmup_ratio": 0.0,
    }
    return ResolvedHyperparameters.model_validate({**values, **overrides})


def settings_for(artifacts_root: Path, cache: int = 8) -> Settings:
    return Settings(data_dir=artifacts_root.parent, inference_adapter_cache=cache)


@pytest.fixture
def engine(artifacts_root: Path) -> Engine:
    return Engine(settings_for(artifacts_root))


@pytest.fixture
def client(engine: Engine, artifacts_root: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(artifacts_root), engine)) as test_client:
        yield test_client


def target(
    base: Path, key: str | None = None, method: str | None = "lora", kind: str = "causal_lm"
) -> Target:
    return Target.model_validate(
        {
            "model": f"ft:{key}" if key else base.name,
            "base_path": str(base),
            "artifact_key": key,
            "method": method if key else None,
            "kind": kind,
        }
    )


def reference_peft(base: Path, artifact: Path) -> PeftModel:
    """The artifact loaded alone: a fresh base and a fresh PeftModel, as if nothing else were served."""
    return PeftModel.from_pretrained(fresh_llama(base), artifact).eval()


def reference_answer(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], max_new_tokens: int
) -> tuple[list[int], str, str]:
    """Greedy `generate` on a model loaded on its own: generated ids (through eos), text, finish reason."""
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.eos_token_id,
        )
    ids = out[0, len(prompt_ids) :].tolist()
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
        return ids, tokenizer.decode(ids[:-1], skip_special_tokens=True), "stop"
    return ids, tokenizer.decode(ids, skip_special_tokens=True), "length"


def training_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """The prompt training scores an answer after: tokenize_chat on the conversation plus that answer."""
    example = tokenize_chat(tokenizer, {"messages": [*messages, {"role": "assistant", "content": "Paris."}]})
    assert example.prompt_ids is not None
    return example.prompt_ids


def chat_body(t: Target, **request: object) -> dict[str, object]:
    return {"target": t.model_dump(), "request": {"model": t.model, "messages": MESSAGES, **request}}


def stream_chunks(response: Response) -> list[dict[str, Any]]:
    """The JSON chunks of an event stream, checking its framing and the closing [DONE]."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: ") for event in events[:-1])
    return [json.loads(event.removeprefix("data: ")) for event in events[:-2]]


def streamed_texts(chunks: list[dict[str, Any]]) -> tuple[dict[int, str], dict[int, str]]:
    """Each choice's text joined from its deltas, and its finish reason."""
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            index = choice["index"]
            assert index not in finishes, "a choice sent text after its finish_reason"
            piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
            texts[index] = texts.get(index, "") + (piece or "")
            if choice["finish_reason"]:
                finishes[index] = choice["finish_reason"]
    return texts, finishes
