"""A fleet with no shared disk: the API, a Celery worker and an inference server, each with its own data
directory, keep every artifact and the base model in object storage (a real SeaweedFS). A job trains,
checkpoints, is paused and resumed, publishes; the model is served and downloaded; deleting it removes its
objects."""

import io
import json
import re
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import openai
import pytest

from models.storage_s3 import MANIFEST
from tests.conftest import S3Server, fresh_postgres_database
from tests.e2e.servers import cli, create_key, distributed_env, free_port, process
from tests.jobs_helpers import succeeded, wait_for, write_chat

pytestmark = pytest.mark.e2e


@dataclass
class Fleet:
    client: openai.OpenAI
    api: httpx.Client
    """The same API, for what the openai client has no method for."""
    bucket: Any
    prefix: str
    bucket_name: str

    def stored(self, under: str) -> set[str]:
        """Keys (relative to the deployment's prefix) of the objects under `under`."""
        pages = self.bucket.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket_name, Prefix=f"{self.prefix}/{under}"
        )
        return {item["Key"][len(self.prefix) + 1 :] for page in pages for item in page.get("Contents", [])}


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    """Each process's own data directory."""
    return {role: tmp_path / role for role in ("api", "worker", "serve")}


@pytest.fixture
def fleet(
    tmp_path: Path, dirs: dict[str, Path], tiny_model_dir: Path, redis_url: str, s3_server: S3Server
) -> Iterator[Fleet]:
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    credentials = {"aws_access_key_id": s3_server.access_key, "aws_secret_access_key": s3_server.secret_key}
    bucket = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1", **credentials)
    serve_port, api_port = free_port(), free_port()
    with fresh_postgres_database() as database_url:
        common = distributed_env(
            tmp_path,
            database_url,
            redis_url,
            storage_url=f"s3://{s3_server.bucket}/{prefix}",
            s3_endpoint_url=s3_server.endpoint_url,
            inference_url=f"http://127.0.0.1:{serve_port}",
            inference_token=uuid.uuid4().hex,
        )
        common |= {f"{name.upper()}": value for name, value in credentials.items()}
        common["AWS_DEFAULT_REGION"] = "us-east-1"
        env = {role: common | {"FTJOBS_DATA_DIR": str(path)} for role, path in dirs.items()}
        # Registered from a directory only the API's machine had, which is gone before anything trains.
        base = shutil.copytree(tiny_model_dir, dirs["api"] / "incoming" / "tiny-llama")
        cli("models", "add", "tiny-llama", str(base), env=env["api"])
        shutil.rmtree(base)
        serve = ["serve", "--host", "127.0.0.1", "--port", str(serve_port)]
        api = ["api", "--host", "127.0.0.1", "--port", str(api_port)]
        with (
            process(["worker"], env["worker"], tmp_path / "worker.log"),  # starts while the others load
            process(serve, env["serve"], tmp_path / "serve.log", f"http://127.0.0.1:{serve_port}/healthz"),
            process(api, env["api"], tmp_path / "api.log", f"http://127.0.0.1:{api_port}/healthz"),
        ):
            key, url = create_key(env["api"]), f"http://127.0.0.1:{api_port}/v1"
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
                client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
                yield Fleet(client, http, bucket, prefix, s3_server.bucket)


def test_api_worker_and_inference_server_share_nothing_but_the_store(
    fleet: Fleet, dirs: dict[str, Path], tmp_path: Path
) -> None:
    client, api = fleet.client, fleet.api
    assert any(name.endswith(MANIFEST) for name in fleet.stored("models/"))  # the base, by content hash
    assert api.get(api.base_url.copy_with(path="/readyz")).json()["checks"]["storage"]["status"] == "ok"
    with open(write_chat(tmp_path / "train.jsonl", 30), "rb") as train:
        training_file = client.files.create(file=train, purpose="fine-tune").id
    with open(write_chat(tmp_path / "valid.jsonl", 4, "validation"), "rb") as valid:
        validation_file = client.files.create(file=valid, purpose="fine-tune").id
    # Enough steps that the pause lands mid-run however fast the machine.
    hyperparameters = {"n_epochs": 2, "batch_size": 1, "lora_r": 4, "max_seq_length": 512}
    method = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    body = {"model": "tiny-llama", "training_file": training_file, "validation_file": validation_file}
    # The inference server reads the files and the base through its own store and cache.
    preflight = api.post("/fine_tuning/preflight", json={**body, "method": method})
    assert preflight.status_code == 200, preflight.text
    assert preflight.json()["training_file"]["n_examples"] == 30

    job = client.fine_tuning.jobs.create(**body, method=method)  # type: ignore[arg-type]
    events = client.fine_tuning.jobs.list_events
    wait_for(lambda: any(e.type == "metrics" for e in events(job.id, limit=100)), 300, "training")
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    # Not the first checkpoint listed: an epoch's end may have saved one before the pause's.
    wait_for(lambda: events(job.id, limit=1).data[0].message.startswith("Paused at"), 120, "the pause")
    paused_at = int(re.findall(r"Paused at step (\d+)", events(job.id, limit=1).data[0].message)[0])
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number == paused_at
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    job = succeeded(client, job)
    messages = [event.message for event in events(job.id, limit=1000)]
    assert any(f"resumed from step {paused_at}" in message for message in messages), messages
    assert job.fine_tuned_model is not None
    adapter = f"jobs/{job.id}/attempt-2/adapter/"
    assert f"{adapter}{MANIFEST}" in fleet.stored(adapter)
    assert f"jobs/{job.id}/attempt-1/checkpoints/step-{paused_at}/{MANIFEST}" in fleet.stored("jobs/")

    for model in (job.fine_tuned_model, f"{job.fine_tuned_model}:ckpt-step-{paused_at}"):
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Great film!"}], max_tokens=3
        )
        assert answer.choices[0].message.content is not None

    download = api.get(f"/models/{job.fine_tuned_model}/content")
    assert download.status_code == 200, download.text
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as archive:
        config = next(m for m in archive.getmembers() if m.name.endswith("/adapter_config.json"))
        recorded = json.load(archive.extractfile(config))  # type: ignore[arg-type]
    assert recorded["base_model_name_or_path"] == "tiny-llama"  # not a path on the worker

    client.models.delete(job.fine_tuned_model)
    assert fleet.stored(adapter) == set()
    assert fleet.stored(f"jobs/{job.id}/attempt-1/checkpoints/")  # checkpoints are models of their own

    for path in dirs.values():  # nothing went to a local artifact directory anywhere
        assert not (path / "artifacts").exists()
    assert list((dirs["worker"] / "cache" / "entries").iterdir())
    assert list((dirs["serve"] / "cache" / "entries").iterdir())
