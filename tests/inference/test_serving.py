"""Which model answers: adapters hot-swapped on one shared base, the LRU, dedicated models for every other
artifact, classifiers, and the lineage check. Every answer is compared with the artifact loaded alone."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from pydantic import SecretStr
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from inference.app import create_app
from inference.engine import Engine
from inference.store import AdapterEntry, DedicatedEntry
from models.inference import ChatCompletionRequest, ClassificationRequest
from tests.inference.conftest import (
    LABELS,
    MESSAGES,
    chat_body,
    fresh_llama,
    publish,
    randomize,
    reference_answer,
    reference_peft,
    settings_for,
    stream_chunks,
    streamed_texts,
    target,
    training_prompt_ids,
)
from tests.tiny_model import build_tiny_llama
from worker.training.loading import load_tokenizer
from worker.training.methods.bitfit import load_bitfit
from worker.training.methods.freeze import load_freeze

MAX_TOKENS = 12
PEFT_KEYS = ("lora-a", "lora-b", "lora-c", "lora-r8", "lora-qv", "lora-d", "dora", "ia3", "prompt_tuning")
DEDICATED = ("ia3", "prompt_tuning", "freeze", "bitfit", "full")


@pytest.fixture(scope="module")
def expected(base_dir: Path, artifacts_root: Path) -> dict[str | None, tuple[list[int], str, str]]:
    """Each artifact's greedy answer to MESSAGES, computed on a fresh model of its own."""
    tokenizer = load_tokenizer(str(base_dir))
    prompt = training_prompt_ids(tokenizer, MESSAGES)
    models = {
        None: fresh_llama(base_dir),
        **{key: reference_peft(base_dir, artifacts_root / key) for key in PEFT_KEYS},
        "freeze": load_freeze(fresh_llama(base_dir), artifacts_root / "freeze"),
        "bitfit": load_bitfit(fresh_llama(base_dir), artifacts_root / "bitfit"),
        "full": AutoModelForCausalLM.from_pretrained(artifacts_root / "full").eval(),
    }
    answers = {key: reference_answer(model, tokenizer, prompt, MAX_TOKENS) for key, model in models.items()}
    texts = [text for _, text, _ in answers.values()]
    assert len(set(texts)) == len(texts), "the artifacts must answer differently for these tests to mean much"
    return answers


def method_of(key: str | None) -> str | None:
    return key if key in DEDICATED or key == "dora" else "lora"


def ask(client: TestClient, base_dir: Path, key: str | None, stream: bool = False) -> tuple[str, str, int]:
    """Text, finish reason and completion tokens of a greedy chat answer through the app."""
    body = chat_body(
        target(base_dir, key, method_of(key)), temperature=0, max_tokens=MAX_TOKENS, stream=stream
    )
    response = client.post("/internal/chat/completions", json=body)
    if not stream:
        assert response.status_code == 200, response.text
        answer = response.json()
        choice = answer["choices"][0]
        return choice["message"]["content"], choice["finish_reason"], answer["usage"]["completion_tokens"]
    body["request"]["stream_options"] = {"include_usage": True}  # type: ignore[index]
    chunks = stream_chunks(client.post("/internal/chat/completions", json=body))
    texts, finishes = streamed_texts(chunks)
    return texts[0], finishes[0], chunks[-1]["usage"]["completion_tokens"]


def assert_answers_like_alone(
    answer: tuple[str, str, int], expected: tuple[list[int], str, str], key: str | None
) -> None:
    ids, text, finish = expected
    assert answer == (text, finish, len(ids)), key


def test_adapters_alternate_on_one_base_and_answer_as_alone(
    client: TestClient, engine: Engine, base_dir: Path, expected: dict
) -> None:
    for key in ["lora-a", "lora-b", "lora-a", None, "lora-b", "lora-a"]:
        assert_answers_like_alone(ask(client, base_dir, key), expected[key], key)
        assert_answers_like_alone(ask(client, base_dir, key, stream=True), expected[key], key)

    # One base, loaded once, wrapped in one PeftModel holding both adapters and a spare slot.
    engine.models.settle(60)
    assert list(engine.models.bases) == [str(base_dir)]
    base = engine.models.bases[str(base_dir)]
    assert isinstance(base.peft, PeftModel) and base.peft.get_base_model() is base.model
    entries = list(engine.models.cache.values())
    assert all(isinstance(entry, AdapterEntry) for entry in entries) and len(entries) == 2
    assert base.spare is not None
    assert set(base.peft.peft_config) == {entry.name for entry in entries} | {base.spare}
    # They carry the tokenizer as training saves the base's: the base's own object serves them.
    assert all(entry.tokenizer is base.tokenizer for entry in entries)


def test_concurrent_requests_on_one_base_each_get_their_adapter(
    engine: Engine, base_dir: Path, expected: dict
) -> None:
    keys = ["lora-a", "lora-b", None, "lora-c"] * 3

    def answer(key: str | None) -> tuple[str, str, int]:
        request = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": MAX_TOKENS}
        )
        result = engine.chat(target(base_dir, key, method_of(key)), request)
        choice = result["choices"][0]
        return choice["message"]["content"], choice["finish_reason"], result["usage"]["completion_tokens"]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(answer, keys))
    for key, got in zip(keys, answers, strict=True):
        assert_answers_like_alone(got, expected[key], key)


def test_lru_evicts_adapters_and_an_evicted_one_answers_the_same_again(
    artifacts_root: Path, base_dir: Path, expected: dict
) -> None:
    engine = Engine(settings_for(artifacts_root, cache=2))
    with TestClient(create_app(settings_for(artifacts_root), engine)) as client:
        for key in ["lora-a", "lora-b", "lora-c"]:
            assert_answers_like_alone(ask(client, base_dir, key), expected[key], key)
            engine.models.settle(60)
        base = engine.models.bases[str(base_dir)]
        assert [key for _, key in engine.models.cache] == ["lora-b", "lora-c"]
        # lora-a's slot is the spare now, and it was the only one: the cached adapters and one spare.
        assert base.peft is not None and len(base.peft.peft_config) == 3

        assert_answers_like_alone(ask(client, base_dir, "lora-a", stream=True), expected["lora-a"], "lora-a")
        assert [key for _, key in engine.models.cache] == ["lora-c", "lora-a"]
        engine.models.settle(60)
        assert len(base.peft.peft_config) == 3

        # Dedicated models share the LRU: two of them evict every adapter, and the base keeps one slot.
        for key in ["ia3", "freeze"]:
            assert_answers_like_alone(ask(client, base_dir, key), expected[key], key)
        assert all(isinstance(entry, DedicatedEntry) for entry in engine.models.cache.values())
        assert list(base.peft.peft_config) == [base.spare]
        assert_answers_like_alone(ask(client, base_dir, None), expected[None], None)
        assert_answers_like_alone(ask(client, base_dir, "lora-b"), expected["lora-b"], "lora-b")
        assert list(engine.models.bases) == [str(base_dir)]


def test_an_adapter_evicted_while_its_base_is_busy_is_deleted_by_that_base_next_request(
    artifacts_root: Path, base_dir: Path, tmp_path: Path, expected: dict
) -> None:
    other_base = build_tiny_llama(tmp_path / "other-base", seed=1)
    adapter = get_lora_on(other_base, artifacts_root / "other-lora")
    engine = Engine(settings_for(artifacts_root, cache=1))
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": MAX_TOKENS}
    )
    engine.chat(target(other_base, adapter), request)
    engine.models.settle(60)
    other = engine.models.bases[str(other_base)]
    assert other.peft is not None and other.spare is not None
    (name,) = set(other.peft.peft_config) - {other.spare}

    with engine.models.lock(str(other_base)):  # that base is busy generating when its adapter is evicted
        engine.chat(target(base_dir, "lora-a"), request)
    assert other.pending == [name] and name in other.peft.peft_config
    engine.chat(target(other_base), request)  # its next request, for the base itself, deletes it
    assert other.pending == [] and list(other.peft.peft_config) == [other.spare]
    assert len(engine.models.bases) == 2


def test_a_new_adapter_is_copied_into_a_free_slot_whatever_its_rank_and_target_modules(
    artifacts_root: Path, base_dir: Path, expected: dict
) -> None:
    """One adapter cached: each new one goes into the slot the last one left (larger and smaller ranks,
    fewer target modules, other scalings and dropouts). A DoRA adapter, which peft can't mix in a batch, is
    a dedicated model: it leaves the shared base's slots alone."""
    engine = Engine(settings_for(artifacts_root, cache=1))
    with TestClient(create_app(settings_for(artifacts_root), engine)) as client:
        base_path = str(base_dir)
        copied = []
        sequence = [
            "lora-r8",
            "lora-qv",
            "lora-d",
            "dora",
            "lora-r8",
            "lora-a",
            "lora-b",
            "lora-c",
            "lora-qv",
        ]
        for key in sequence:
            base = engine.models.bases.get(base_path)
            spare = base.spare if base else None
            assert_answers_like_alone(ask(client, base_dir, key, stream=key == "lora-b"), expected[key], key)
            entry = engine.models.cache[(base_path, key)]
            engine.models.settle(60)
            base = engine.models.bases[base_path]
            assert base.peft is not None
            assert not any(module.training for module in base.peft.modules())  # no dropout at inference
            if key == "dora":
                assert isinstance(entry, DedicatedEntry) and entry.served.model is not base.peft
                assert list(base.peft.peft_config) == [base.spare]  # lora-d evicted: its slot deleted
                continue
            assert isinstance(entry, AdapterEntry)
            copied.append(entry.name == spare)
            assert set(base.peft.peft_config) >= {entry.name, base.spare}
        # Injected: only the first.
        assert copied == [False] + [True] * (len(sequence) - 2)


def get_lora_on(base: Path, directory: Path) -> str:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(fresh_llama(base), LoraConfig(r=4, target_modules="all-linear"))
    randomize(model, "lora_B", 8)
    publish(model, directory, base, "lora")
    return directory.name


def test_dedicated_models_do_not_touch_the_shared_base(
    client: TestClient, engine: Engine, base_dir: Path, expected: dict
) -> None:
    for key in ["ia3", "lora-a", "freeze", None, "prompt_tuning", "bitfit", "full", "ia3"]:
        assert_answers_like_alone(ask(client, base_dir, key), expected[key], key)
        assert_answers_like_alone(ask(client, base_dir, key, stream=True), expected[key], key)
    engine.models.settle(60)
    base = engine.models.bases[str(base_dir)]
    assert base.peft is not None and len(base.peft.peft_config) == 2  # lora-a and a spare slot
    dedicated = [entry for entry in engine.models.cache.values() if isinstance(entry, DedicatedEntry)]
    assert len(dedicated) == len(DEDICATED)
    assert all(entry.served.model is not base.model for entry in dedicated)


@pytest.mark.parametrize(
    ("key", "code", "in_message"),
    [
        ("mismatch", "model_mismatch", "sha256:" + "f" * 64),
        ("no-lineage", "missing_lineage", "lineage.json"),
    ],
)
def test_artifacts_that_cannot_be_checked_against_the_base_are_refused(
    client: TestClient, engine: Engine, base_dir: Path, key: str, code: str, in_message: str
) -> None:
    for stream in (False, True):
        body = chat_body(target(base_dir, key), temperature=0, max_tokens=4, stream=stream)
        response = client.post("/internal/chat/completions", json=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", code)
        assert in_message in error["message"]
    if key == "mismatch":  # both hashes are named: the artifact's and the loaded base's
        assert engine.models.content_hash(str(base_dir)) in error["message"]
    assert engine.models.cache == {}


def test_a_classifier_answers_as_alone_and_refuses_generation(
    client: TestClient, bert_dir: Path, artifacts_root: Path, base_dir: Path
) -> None:
    texts = ["The weather today is sunny.", "What is the capital of Spain? Madrid."]
    classifier = target(bert_dir, "classifier", kind="classification")
    body = {"target": classifier.model_dump(), "request": {"model": classifier.model, "input": texts}}
    response = client.post("/internal/classifications", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()

    alone = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=len(LABELS))
    alone = PeftModel.from_pretrained(alone, artifacts_root / "classifier").eval()
    tokenizer = load_tokenizer(str(bert_dir))
    with torch.no_grad():
        probabilities = [
            alone(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0] for text in texts
        ]
    assert answer["object"] == "list" and answer["model"] == "ft:classifier"
    assert [item["index"] for item in answer["data"]] == [0, 1]
    for item, expected in zip(answer["data"], probabilities, strict=True):
        assert item["object"] == "classification"
        assert list(item["scores"]) == LABELS
        assert [item["scores"][label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-5)
        assert item["label"] == LABELS[int(expected.argmax())]
        assert item["score"] == pytest.approx(float(expected.max()), abs=1e-5)
    # The inputs really are told apart: by ten times the tolerance above (the margin moved between 0.0009
    # and 0.001 from run to run, so 1e-3 failed by chance).
    assert abs(probabilities[0][0] - probabilities[1][0]) > 1e-4

    # A classifier does not generate, and a causal LM does not classify.
    response = client.post("/internal/chat/completions", json=chat_body(classifier, max_tokens=2))
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    lm = target(base_dir, "lora-a")
    body = {"target": lm.model_dump(), "request": {"model": lm.model, "input": "hello"}}
    response = client.post("/internal/classifications", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    ClassificationRequest.model_validate(body["request"])  # the request itself was valid


def test_a_feature_extraction_classifier_answers_as_its_head_on_mean_pooled_states(
    client: TestClient, bert_dir: Path, artifacts_root: Path
) -> None:
    texts = ["The weather today is sunny.", "Fruit: apple banana cherry"]
    classifier = target(bert_dir, "feature_extraction", method=None, kind="classification")
    body = {"target": classifier.model_dump(), "request": {"model": classifier.model, "input": texts}}
    response = client.post("/internal/classifications", json=body)
    assert response.status_code == 200, response.text

    encoder, tokenizer = AutoModel.from_pretrained(bert_dir).eval(), load_tokenizer(str(bert_dir))
    head = load_file(artifacts_root / "feature_extraction" / "head.safetensors")
    for item, text in zip(response.json()["data"], texts, strict=True):
        with torch.no_grad():
            pooled = encoder(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].mean(dim=0).double()
        positive = torch.sigmoid(pooled @ head["coef"][0] + head["intercept"][0]).item()
        assert item["scores"] == pytest.approx(
            dict(zip(LABELS, [1 - positive, positive], strict=True)), abs=1e-6
        )


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_with_a_token_set_only_requests_carrying_it_are_served(
    artifacts_root: Path, engine: Engine, base_dir: Path
) -> None:
    settings = settings_for(artifacts_root).model_copy(update={"inference_token": SecretStr("s3cret")})
    with TestClient(create_app(settings, engine)) as client:
        body = chat_body(target(base_dir), temperature=0, max_tokens=2)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            refused = client.post("/internal/chat/completions", json=body, headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        served = client.post(
            "/internal/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"}
        )
        assert served.status_code == 200, served.text
        assert client.get("/healthz").status_code == 200
