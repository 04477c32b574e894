"""The `compute` extension on job creation: echoed on the job, and a 400 naming the field for what this
service cannot train on (docs/distributed.md). Training on several devices is tests/training/
test_distributed.py and tests/faults/test_distributed_kill.py."""

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from models.settings import Settings
from tests.conftest import RecordingDispatcher, Tenant
from tests.test_api_files import assert_error, upload

WORKER_DEVICES = 2


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"devices": WORKER_DEVICES})


def create(client: TestClient, model: str, training_type: str = "lora", **body: object):  # type: ignore[no-untyped-def]
    method = {"type": "supervised", "supervised": {"hyperparameters": {"training_type": training_type}}}
    training_file = upload(client).json()["id"]
    return client.post(
        "/v1/fine_tuning/jobs",
        json={"model": model, "training_file": training_file, "method": method, **body},
    )


def test_compute_is_echoed_with_its_defaults(client: TestClient, registered_model: str) -> None:
    default = create(client, registered_model).json()
    assert default["compute"] == {"devices": 1, "nodes": 1, "device_class": None}

    job = create(client, registered_model, compute={"devices": WORKER_DEVICES}).json()
    assert job["compute"] == {"devices": WORKER_DEVICES, "nodes": 1, "device_class": None}
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["compute"] == job["compute"]


@pytest.mark.parametrize(
    ("compute", "training_type", "param"),
    [
        ({"devices": 0}, "lora", "compute.devices"),
        ({"devices": 65}, "lora", "compute.devices"),
        ({"devices": "2"}, "lora", "compute.devices"),
        ({"devices": WORKER_DEVICES + 1}, "lora", "compute.devices"),  # more than the workers have
        ({"nodes": 2}, "lora", "compute.nodes"),  # several nodes: only with FTJOBS_EXECUTOR=slurm
        ({"nodes": 0}, "lora", "compute.nodes"),
        ({"device_class": "a100"}, "lora", "compute.device_class"),  # no worker registered it
        ({"gpus": 2}, "lora", "compute.gpus"),
    ],
)
def test_what_cannot_be_trained_on_is_a_400_naming_the_field(
    client: TestClient, registered_model: str, compute: dict[str, object], training_type: str, param: str
) -> None:
    response = create(client, registered_model, training_type, compute=compute)
    assert_error(response, 400, param)


@pytest.mark.parametrize("training_type", ["full", "freeze"])
def test_whole_model_methods_take_several_devices(
    client: TestClient, registered_model: str, training_type: str
) -> None:
    """Sharded over the ranks (FSDP2), like adapter methods are replicated."""
    response = create(client, registered_model, training_type, compute={"devices": WORKER_DEVICES})
    assert response.status_code == 200, response.text
    assert response.json()["compute"]["devices"] == WORKER_DEVICES


def test_feature_extraction_takes_one_device(client: TestClient, registered_model: str) -> None:
    """A single solve, not steps: nothing to spread (checked before the method's other rules)."""
    response = create(client, registered_model, "feature_extraction", compute={"devices": 2})
    assert_error(response, 400, "compute.devices")


def test_several_nodes_need_a_cluster_executor(
    settings: Settings, dispatcher: RecordingDispatcher, tenant: Tenant, registered_model: str
) -> None:
    """With FTJOBS_EXECUTOR=slurm a job may span nodes (tests/slurm trains them); data-parallel ones only."""
    app = create_app(settings.model_copy(update={"executor": "slurm"}), dispatcher)
    with TestClient(app, raise_server_exceptions=False, headers=tenant.headers) as client:
        job = create(client, registered_model, compute={"nodes": 2}).json()
        assert job["compute"] == {"devices": 1, "nodes": 2, "device_class": None}
        assert_error(create(client, registered_model, "full", compute={"nodes": 2}), 400, "compute.nodes")
