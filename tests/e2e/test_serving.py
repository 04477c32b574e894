"""Serving through the official openai client against a real `ftjobs up`, which starts `ftjobs serve`: two
adapters fine-tuned by real jobs, alternated request by request on one base (streamed and not), each
answering as it does when loaded alone; a checkpoint as a model; a deleted model gone; a base whose
content changed refused."""

from pathlib import Path

import httpx
import openai
import pytest
import torch
from openai.types.fine_tuning import FineTuningJob
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.e2e.servers import cli, create_key, free_port, process
from tests.jobs_helpers import chat_lines, succeeded, wait_for
from tests.tiny_model import build_tiny_llama

pytestmark = pytest.mark.e2e

QUESTIONS = [
    "Is this review positive or negative? A moving, funny film.",
    "Is this review positive or negative? Dull and far too long.",
]
MAX_TOKENS = 10


def start_job(client: openai.OpenAI, tmp_path: Path, split: str, seed: int) -> FineTuningJob:
    path = tmp_path / f"{split}.jsonl"
    path.write_bytes(chat_lines(12, split))
    with open(path, "rb") as train:
        training_file = client.files.create(file=train, purpose="fine-tune")
    return client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training_file.id,
        seed=seed,
        method={
            "type": "supervised",
            "supervised": {  # a large step, so the two adapters answer differently from each other
                "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 50}
            },
        },
    )


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def answer_alone(base_dir: Path, adapter_dir: Path, question: str) -> str:
    """Greedy answer of the adapter loaded on its own, prompted with the chat template it trained with."""
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        output = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False
        )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def ask(client: openai.OpenAI, model: str, question: str, stream: bool) -> str:
    messages = [{"role": "user", "content": question}]
    if not stream:
        completion = client.chat.completions.create(
            model=model,
            messages=messages,
            temperature=0,
            max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
        )
        return completion.choices[0].message.content or ""
    chunks = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,  # type: ignore[arg-type]
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def test_adapters_are_hot_swapped_on_one_base_through_the_openai_client(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    data_dir = tmp_path / "data"
    env = {"FTJOBS_DATA_DIR": str(data_dir), "FTJOBS_HEARTBEAT_SECONDS": "0.5"}
    cli("models", "add", "tiny-llama", str(tiny_model_dir), env=env)
    port, inference_port = free_port(), free_port()
    up = ["up", "--port", str(port), "--inference-port", str(inference_port)]
    with process(up, env, tmp_path / "up.log", f"http://127.0.0.1:{port}/healthz"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=create_key(env), max_retries=0)
        started = [start_job(client, tmp_path, "train", 1), start_job(client, tmp_path, "validation", 2)]
        jobs = [succeeded(client, job) for job in started]
        # `ftjobs up` starts the inference server beside the API; it imports torch, so it can lag behind.
        health_url = f"http://127.0.0.1:{inference_port}/healthz"
        wait_for(lambda: answers(health_url), 120, "the inference server")
        models = [job.fine_tuned_model for job in jobs]
        assert all(models) and {m.id for m in client.models.list()} >= {"tiny-llama", *models}  # type: ignore[operator]

        adapters = [data_dir / "artifacts" / "jobs" / job.id / "attempt-1" / "adapter" for job in jobs]
        expected = {
            (model, question): answer_alone(tiny_model_dir, adapter, question)
            for model, adapter in zip(models, adapters, strict=True)
            for question in QUESTIONS
        }
        # The comparison means something only if the two adapters answer differently.
        assert any(expected[(models[0], q)] != expected[(models[1], q)] for q in QUESTIONS), expected

        for stream in (False, True, False, True):  # alternate adapters request by request
            for question in QUESTIONS:
                for model in models:
                    assert ask(client, model, question, stream) == expected[(model, question)]  # type: ignore[index]
        health = httpx.get(health_url).json()
        assert health["bases_loaded"] == 1 and health["cached"] == 2

        # A checkpoint is a model too; a deleted model answers 404 everywhere.
        checkpoint = client.fine_tuning.jobs.checkpoints.list(jobs[0].id).data[-1].fine_tuned_model_checkpoint
        assert ask(client, checkpoint, QUESTIONS[0], stream=False)
        assert client.models.delete(models[1]).deleted  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):
            ask(client, models[1], QUESTIONS[0], stream=False)  # type: ignore[arg-type]

        # The registry's name now points at other weights: the adapter is refused, not put on them.
        other = build_tiny_llama(tmp_path / "other-llama", seed=7)
        cli("models", "add", "tiny-llama", str(other), env=env)
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, models[0], QUESTIONS[0], stream=False)  # type: ignore[arg-type]
        assert refused.value.code == "model_mismatch" and refused.value.param == "model"
