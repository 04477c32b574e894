"""Tuning a tuned model further (issue 19, item 6), through the official openai client and the real runner:
a LoRA job continued by another on its `fine_tuned_model`, a full job on a LoRA checkpoint (merged first),
the lineage chain, and the same 400 for another organisation's model as for an unknown one."""

from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from peft import PeftModel
from sqlalchemy.orm import Session, sessionmaker
from transformers import AutoModelForCausalLM

from api.jobs.schemas import JobCreate
from api.preflight.service import inference_request
from models.db import session_scope
from models.settings import Settings
from models.storage import LocalArtifactStore
from tests.conftest import Tenant, make_tenant
from tests.jobs_helpers import chat_lines
from tests.test_api_models import openai_client
from tests.test_runner import runner, upload  # noqa: F401 (runner: a fixture)
from worker.runner import JobRunner

TRAIN = chat_lines(10)
# One batch per step over the whole file: each step's loss is the loss of the weights it starts from on the
# same examples, so a continued job's first loss is comparable with its parent's last.
SHARED = {"batch_size": 10, "max_seq_length": 256, "learning_rate": 3e-2, "warmup_ratio": 0.0}


def create(api: openai.OpenAI, client: TestClient, model: str, **hyper: object) -> str:
    job = api.fine_tuning.jobs.create(
        model=model,
        training_file=upload(client, TRAIN),
        seed=7,
        # Our extensions ride in the hyperparameters, beside OpenAI's.
        extra_body={"method": {"type": "supervised", "supervised": {"hyperparameters": hyper}}},
    )
    return job.id


def losses(api: openai.OpenAI, job_id: str) -> list[float]:
    """The job's training loss at each step, in order."""
    events = api.fine_tuning.jobs.list_events(job_id, limit=200).data
    data = [e.data for e in events if e.type == "metrics"]
    by_step = {d["step"]: d["train_loss"] for d in data if isinstance(d, dict)}
    by_step.pop(0, None)  # the baseline evaluation, when there is one
    return [by_step[step] for step in sorted(by_step)]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # the database is not what varies
def test_a_tuned_model_is_tuned_further(
    client: TestClient,
    runner: JobRunner,  # noqa: F811
    registered_model: str,
    settings: Settings,
    session_factory: sessionmaker[Session],
    tiny_model_dir: Path,
    tenant: Tenant,
) -> None:
    api = openai_client(client)
    first_id = create(api, client, registered_model, n_epochs=8, lora_r=4, lora_dropout=0.0, **SHARED)
    runner.run(first_id)
    first = api.fine_tuning.jobs.retrieve(first_id)
    assert first.status == "succeeded" and first.fine_tuned_model
    parent = first.fine_tuned_model

    # lora_r is inherited from the parent (8 would be the default); the adapter trains on from its weights.
    second_id = create(api, client, parent, n_epochs=2, lora_dropout=0.0, **SHARED)
    runner.run(second_id)
    second = api.fine_tuning.jobs.retrieve(second_id)
    assert second.status == "succeeded", second.error
    assert second.model == parent and second.fine_tuned_model
    assert second.fine_tuned_model.startswith(f"ft:{registered_model}:local::")
    before, after = losses(api, first_id), losses(api, second_id)
    learnt = before[0] - before[-1]
    assert learnt > 0.1, before
    # Continuing: the second job starts where the first ended, not where the base starts.
    assert abs(after[0] - before[-1]) < 0.3 * learnt, (before, after)

    lineage = (api.models.retrieve(second.fine_tuned_model).model_extra or {})["lineage"]
    assert lineage["parent_model"] == parent and lineage["training_type"] == "lora"
    assert lineage["hyperparameters"]["lora_r"] == 4
    assert lineage["parent"]["job_id"] == first_id and lineage["parent"]["parent"] is None
    assert lineage["base_model"]["name"] == lineage["parent"]["base_model"]["name"] == registered_model
    # The continued adapter is an ordinary adapter on the base: what serving loads.
    adapter_dir = settings.artifacts_root / "jobs" / second_id / "attempt-1" / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True)
    assert PeftModel.from_pretrained(base, adapter_dir).peft_config["default"].r == 4  # pyright: ignore[reportAttributeAccessIssue]

    # A checkpoint as the start of a full job: the adapter is merged into the base first.
    checkpoint = api.fine_tuning.jobs.checkpoints.list(first_id).data[0].fine_tuned_model_checkpoint
    full_id = create(
        api, client, checkpoint, n_epochs=1, training_type="full", **{**SHARED, "learning_rate": 1e-5}
    )
    runner.run(full_id)
    full = api.fine_tuning.jobs.retrieve(full_id)
    assert full.status == "succeeded" and full.fine_tuned_model, full.error
    assert losses(api, full_id)[0] < before[0] - 0.7 * learnt  # it starts from the tuned weights
    full_lineage = (api.models.retrieve(full.fine_tuned_model).model_extra or {})["lineage"]
    assert full_lineage["parent_model"] == checkpoint and full_lineage["training_type"] == "full"
    assert full_lineage["parent"]["training_type"] == "lora"

    # What can't start from it is a 400 on `model` at create: a new adapter shape, an unsupported method.
    for hyper, says in [({"lora_r": 16}, "lora_r=4"), ({"training_type": "freeze"}, "not 'freeze'")]:
        with pytest.raises(openai.BadRequestError) as refused:
            create(api, client, parent, **hyper)
        error = refused.value.body
        assert isinstance(error, dict) and error["param"] == "model" and says in error["message"]

    # The pre-flight takes the same request and sizes it on the registered base.
    store = LocalArtifactStore(settings.artifacts_root)
    body = JobCreate(model=parent, training_file=upload(client, TRAIN))
    with session_scope(session_factory) as session:
        request = inference_request(session, store, settings, tenant.id, body)
    assert request.base_model_path == str(tiny_model_dir)

    # Another organisation's model is refused exactly as one that does not exist.
    other = make_tenant(session_factory, "other")
    other_api = openai.OpenAI(
        base_url="http://testserver/v1", api_key=other.key, http_client=client, max_retries=0
    )
    refusals = []
    for model in [parent, checkpoint, "ft:tiny-llama:local::nothere"]:
        with pytest.raises(openai.BadRequestError) as refused:
            other_api.fine_tuning.jobs.create(model=model, training_file=upload(client, TRAIN, other.headers))
        error = refused.value.body
        assert isinstance(error, dict) and error["code"] == "model_not_found" and error["param"] == "model"
        refusals.append(error["message"].replace(model, "MODEL"))
    assert len(set(refusals)) == 1, refusals
