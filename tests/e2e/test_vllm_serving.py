"""`ftjobs serve --engine vllm` behind a real `ftjobs api`, through the official openai client: a tiny base
answers greedily as transformers does (float32), streamed or not; a seeded sampled request repeats; an
over-long prompt is refused by the shared checks; and a LoRA adapter, loaded at run time by name, answers
as PEFT does. vLLM is an optional install that conflicts with this project's pins (docs/models.md), so
the inference server may run in another environment: FTJOBS_TEST_VLLM_PYTHON names its interpreter.
Skipped when no interpreter with vLLM is at hand."""

import importlib.util
import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.settings import Settings
from models.storage import open_store
from tests.conftest import fresh_postgres_database
from tests.e2e.servers import cli, create_key, distributed_env, free_port, process
from tests.inference.conftest import fresh_llama, publish, randomize
from tests.tiny_model import build_tiny_llama

pytestmark = pytest.mark.e2e

QUESTION = "What is the capital of France?"
MAX_TOKENS = 8


def vllm_python() -> str | None:
    """An interpreter that can import vLLM: FTJOBS_TEST_VLLM_PYTHON, else this one if it can."""
    named = os.environ.get("FTJOBS_TEST_VLLM_PYTHON")
    if named:
        found = subprocess.run([named, "-c", "import vllm"], capture_output=True)
        assert found.returncode == 0, f"FTJOBS_TEST_VLLM_PYTHON={named} cannot import vllm"
        return named
    return sys.executable if importlib.util.find_spec("vllm") else None


def greedy(base_dir: Path, adapter_dir: Path | None) -> str:
    """What transformers (and PEFT) answer greedily, in float32, to QUESTION in the chat template."""
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        output = model.eval().generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False
        )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.timeout(1800)  # vLLM's imports and engine start: minutes on a loaded 2-core machine
def test_vllm_engine_serves_a_base_and_a_lora_adapter(tmp_path: Path, redis_url: str) -> None:
    python = vllm_python()
    if python is None:
        pytest.skip("no vLLM here: FTJOBS_TEST_VLLM_PYTHON names an interpreter with it (docs/models.md)")
    # vLLM's CPU attention takes heads of 32 dimensions and more.
    base_dir = build_tiny_llama(tmp_path / "tiny-llama", head_dim=32)
    data_dir = tmp_path / "data"
    store = open_store(Settings(data_dir=data_dir))
    adapter_dir, ia3_dir = store.local_path("adapters/lora-a"), store.local_path("adapters/ia3")
    adapter = get_peft_model(fresh_llama(base_dir), LoraConfig(r=8, target_modules="all-linear"))
    randomize(adapter, "lora_B", seed=1)
    publish(adapter, adapter_dir, base_dir, "lora")
    ia3 = get_peft_model(fresh_llama(base_dir), IA3Config(task_type="CAUSAL_LM"))  # not a vLLM adapter
    randomize(ia3, "ia3_l", seed=4)
    publish(ia3, ia3_dir, base_dir, "ia3")
    expected = {None: greedy(base_dir, None), "lora-a": greedy(base_dir, adapter_dir)}
    expected["ia3"] = greedy(base_dir, ia3_dir)
    assert len(set(expected.values())) == 3  # else an adapter's answer would prove nothing

    token, inference_port, port = secrets.token_urlsafe(16), free_port(), free_port()
    inference_url = f"http://127.0.0.1:{inference_port}"
    with fresh_postgres_database() as database_url:
        env = distributed_env(
            data_dir, database_url, redis_url, inference_url=inference_url, inference_token=token
        )
        cli("models", "add", "tiny-llama", str(base_dir), env=env)
        serving = env | {
            "FTJOBS_INFERENCE_VLLM_ARGS": '{"dtype": "float32"}',  # transformers' precision, to compare
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; vLLM's default takes a share of the machine's memory
        }
        serve = ["serve", "--engine", "vllm", "--port", str(inference_port)]
        api = ["api", "--host", "127.0.0.1", "--port", str(port)]
        with (
            # Importing vLLM alone takes a minute on a loaded 2-core machine.
            process(serve, serving, tmp_path / "serve.log", f"{inference_url}/healthz", python, 600, True),
            process(api, env, tmp_path / "api.log", f"http://127.0.0.1:{port}/healthz"),
        ):
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=create_key(env), max_retries=0
            )
            messages = [{"role": "user", "content": QUESTION}]
            options = {"model": "tiny-llama", "messages": messages, "max_tokens": MAX_TOKENS}
            # The first request loads the base into vLLM: minutes on a loaded 2-core machine.
            answer = client.chat.completions.create(**options, temperature=0, timeout=900)  # type: ignore[call-overload]
            assert answer.choices[0].message.content == expected[None]
            assert answer.usage is not None and answer.usage.completion_tokens == MAX_TOKENS
            chunks = client.chat.completions.create(**options, temperature=0, stream=True)  # type: ignore[call-overload]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[None]
            # Reading the scores: ftjobs' engine answers it in the same process, the same greedy answer.
            scored = client.chat.completions.create(**options, temperature=0, logprobs=True, timeout=900)  # type: ignore[call-overload]
            assert scored.choices[0].message.content == expected[None]
            assert scored.choices[0].logprobs is not None and scored.choices[0].logprobs.content

            seeded = [
                client.completions.create(model="tiny-llama", prompt="The sky", max_tokens=6, n=2, seed=7)
                for _ in range(2)
            ]
            texts = [[choice.text for choice in completion.choices] for completion in seeded]
            assert texts[0] == texts[1] and texts[0][0] != texts[0][1], texts

            with pytest.raises(openai.BadRequestError) as refused:
                client.completions.create(model="tiny-llama", prompt="word " * 600, max_tokens=4)
            assert refused.value.code == "context_length_exceeded" and refused.value.param == "prompt"

            # Adapters, on the inference server's own route: the LoRA one loaded by name into vLLM at its
            # first request, the ia3 one served by ftjobs' engine in the same process.
            for name in ("lora-a", "ia3"):
                target = {
                    "model": f"ft:{name}",
                    "base_path": str(base_dir),
                    "artifact_key": f"adapters/{name}",
                }
                request = {
                    "model": f"ft:{name}",
                    "messages": messages,
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                }
                answered = httpx.post(
                    f"{inference_url}/internal/chat/completions",
                    json={"target": target, "request": request, "organization": "local"},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=600,
                )
                assert answered.status_code == 200, answered.text
                assert answered.json()["choices"][0]["message"]["content"] == expected[name], name
