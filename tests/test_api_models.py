"""/v1/models through the official openai client: base models, a real job's fine-tuned model and its
checkpoints with their lineage, artifact downloads, deletion; and the inference routes' own checks."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM

from models.lineage import tokenizer_hash
from models.registry import content_hash
from models.settings import Settings
from tests.conftest import RecordingDispatcher, Tenant
from tests.jobs_helpers import chat_lines
from tests.test_runner import create_job, runner, upload  # noqa: F401 (runner: a fixture)
from worker.runner import JobRunner


def openai_client(client: TestClient) -> openai.OpenAI:
    """The official client over the test client, with the test client's API key."""
    key = client.headers["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)


def members(client: TestClient, model: str, fmt: str = "adapter") -> dict[str, bytes]:
    response = client.get(f"/v1/models/{model}/content", params={"format": fmt})
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_models_list_retrieve_download_and_delete(
    client: TestClient,
    runner: JobRunner,  # noqa: F811
    registered_model: str,
    settings: Settings,
    tiny_model_dir: Path,
) -> None:
    train = chat_lines(12)
    job_id = create_job(client, registered_model, train, chat_lines(4, "validation"), n_epochs=2)
    runner.run(job_id)
    api = openai_client(client)
    job = api.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded" and job.fine_tuned_model
    tuned, step_3 = job.fine_tuned_model, f"{job.fine_tuned_model}:ckpt-step-3"

    listed = {model.id: model for model in api.models.list()}
    assert listed[registered_model].owned_by == "system"
    assert listed[tuned].owned_by == job.organization_id
    assert tuned.split(":")[2] == "local"  # the organisation's name
    assert listed[tuned].model_extra["kind"] == "fine-tuned"  # type: ignore[index]
    assert {f"{tuned}:ckpt-step-6", step_3} <= set(listed)

    model = api.models.retrieve(tuned)
    extra = model.model_extra or {}
    assert extra["base_model"] == registered_model and extra["fine_tuning_job"] == job_id
    lineage = extra["lineage"]
    assert lineage["base_model"] == {"name": registered_model, "content_hash": content_hash(tiny_model_dir)}
    assert lineage["training_file"] == {"id": job.training_file, "sha256": hashlib.sha256(train).hexdigest()}
    assert lineage["validation_file"]["id"] == job.validation_file
    assert lineage["training_type"] == "lora" and lineage["objective"] == "sft"
    assert lineage["hyperparameters"]["n_epochs"] == 2 and lineage["step"] == 6
    assert lineage["metrics"]["full_valid_loss"] > 0
    assert {"torch", "transformers", "peft"} <= set(lineage["libraries"])
    adapter_dir = settings.artifacts_root / "jobs" / job_id / "attempt-1" / "adapter"
    assert lineage["tokenizer_hash"] == tokenizer_hash(adapter_dir)
    checkpoint = api.models.retrieve(step_3).model_extra or {}
    assert checkpoint["kind"] == "checkpoint" and checkpoint["step"] == 3
    assert checkpoint["lineage"]["step"] == 3 and checkpoint["lineage"]["base_model"] == lineage["base_model"]

    # Downloads: safetensors, tokenizer (its chat template) and lineage; never a checkpoint's trainer state.
    root = tuned.replace(":", "_")
    files = members(client, tuned)
    assert {
        f"{root}/adapter_model.safetensors",
        f"{root}/adapter_config.json",
        f"{root}/lineage.json",
    } <= set(files)
    assert (
        files[f"{root}/adapter_model.safetensors"] == (adapter_dir / "adapter_model.safetensors").read_bytes()
    )
    assert any(name.startswith(f"{root}/tokenizer") for name in files)
    # The base is named as registered: the server's directory for it is nobody else's business.
    assert json.loads(files[f"{root}/adapter_config.json"])["base_model_name_or_path"] == registered_model
    assert [name for name, data in files.items() if str(tiny_model_dir).encode() in data] == []
    checkpoint_files = members(client, step_3)
    assert any(name.endswith("adapter_model.safetensors") for name in checkpoint_files)
    assert not [name for name in checkpoint_files if "/trainer/" in name or name.endswith("COMPLETE")]
    merged = client.get(f"/v1/models/{tuned}/content", params={"format": "merged"})
    assert merged.status_code == 404 and merged.json()["error"]["param"] == "format"

    with pytest.raises(openai.PermissionDeniedError):
        api.models.delete(registered_model)
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("ft:tiny-llama:local::nothere")

    assert api.models.delete(step_3).deleted
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve(step_3)
    assert api.models.delete(tuned).deleted
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve(tuned)
    assert not adapter_dir.exists()
    assert tuned not in {model.id for model in api.models.list()}
    assert f"{tuned}:ckpt-step-6" in {model.id for model in api.models.list()}  # its own version
    assert api.fine_tuning.jobs.retrieve(job_id).fine_tuned_model == tuned  # the job keeps its record


def test_inference_routes_check_the_request_and_the_model(
    tmp_path: Path, database_url: str, registered_model: str, tenant: Tenant
) -> None:
    from api.main import create_app

    # Nothing listens on the inference URL: a valid request for a known model is a 503, not a 500.
    settings = Settings(
        data_dir=tmp_path / "data", database_url=database_url, inference_url="http://127.0.0.1:9"
    )
    app = create_app(settings, RecordingDispatcher())
    with TestClient(app, raise_server_exceptions=False, headers=tenant.headers) as client:
        api = openai_client(client)
        messages = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.BadRequestError) as bad:
            api.chat.completions.create(model=registered_model, messages=messages, temperature=3)  # type: ignore[arg-type]
        assert bad.value.body["param"] == "temperature"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError) as missing:
            api.chat.completions.create(model="ft:tiny-llama:local::nothere", messages=messages)  # type: ignore[arg-type]
        assert missing.value.body["param"] == "model" and missing.value.code == "model_not_found"  # type: ignore[index]
        with pytest.raises(openai.InternalServerError) as down:
            api.chat.completions.create(model=registered_model, messages=messages)  # type: ignore[arg-type]
        assert down.value.status_code == 503 and down.value.body["code"] == "inference_unavailable"  # type: ignore[index]
        assert down.value.response.headers["retry-after"]


def test_a_merged_export_is_published_verified_and_downloadable(
    client: TestClient,
    runner: JobRunner,  # noqa: F811
    registered_model: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    body = {
        "model": registered_model,
        "training_file": upload(client, chat_lines(12)),
        "validation_file": upload(client, chat_lines(4, "validation")),
        "export_merged": True,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
    }
    ia3 = {"type": "supervised", "supervised": {"hyperparameters": {"training_type": "ia3"}}}
    refused = client.post("/v1/fine_tuning/jobs", json={**body, "method": ia3})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "export_merged"
    created = client.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code == 200, created.text
    runner.run(created.json()["id"])
    api = openai_client(client)
    job = api.fine_tuning.jobs.retrieve(created.json()["id"])
    assert job.status == "succeeded", job.error
    assert job.model_extra and job.model_extra["export_merged"] is True
    tuned = job.fine_tuned_model
    assert tuned and (api.models.retrieve(tuned).model_extra or {})["formats"] == ["adapter", "merged"]
    events = [e.message for e in api.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(message.startswith("Merged export verified") for message in events)

    # The downloaded merged model is a plain transformers model computing what the adapter on its base does.
    for fmt in ("adapter", "merged"):
        (tmp_path / fmt).mkdir()
        for name, content in members(client, tuned, fmt).items():
            assert str(tiny_model_dir).encode() not in content, name  # named as registered; still loads below
            (tmp_path / fmt / Path(name).name).write_bytes(content)
    assert json.loads((tmp_path / "merged" / "lineage.json").read_text())["job_id"] == job.id
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", use_safetensors=True)
    assert getattr(merged.config, "quantization_config", None) is None
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted_logits = PeftModel.from_pretrained(base, tmp_path / "adapter")(ids).logits
        merged_logits = merged(ids).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=0, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits)
