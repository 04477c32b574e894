"""The scheduler of record (models/scheduling.py) on the real databases: the claim's order, fit, caps and
fair share; racing claimers on Postgres; wait events and preemption; the API's bad input and budget 429."""

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from models.db import session_scope
from models.jobs import JobRepository
from models.orm import Job, JobEvent, Organization
from models.scheduling import Capacity, Preemption, Scheduler, Workers, check_budget, wait_reason
from models.settings import Settings
from models.states import JobStatus, transition
from models.storage import LocalArtifactStore
from tests.conftest import RecordingDispatcher, Tenant
from tests.jobs_helpers import chat_lines, wait_for
from tests.test_api_files import assert_error
from tests.test_runner import FAST, adapter_tensors, upload
from worker.reconciler import Reconciler
from worker.runner import JobRunner

CPU = Capacity(1, "cpu")
_ids = itertools.count()


def queue(
    factory: sessionmaker[Session],
    org: str,
    *,
    priority: int = 5,
    devices: int = 1,
    device_class: str | None = None,
    preemptible: bool = False,
    n: int = 1,
) -> list[str]:
    ids = []
    with session_scope(factory) as session:
        for _ in range(n):
            job = Job(
                id=f"ftjob-{next(_ids)}-{time.perf_counter_ns()}",
                organization_id=org,
                model="m",
                training_file="file-x",
                status=JobStatus.QUEUED.value,
                method={"type": "supervised"},
                seed=1,
                result_files=[],
                created_at=int(time.time()),
                attempt=0,
                priority=priority,
                devices=devices,
                device_class=device_class,
                preemptible=preemptible,
            )
            session.add(job)
            session.flush()  # seq follows the order of creation
            ids.append(job.id)
    return ids


def claim(factory: sessionmaker[Session], worker: str = "w1", capacity: Capacity = CPU) -> str | None:
    with session_scope(factory) as session:
        job = Scheduler(session, window_seconds=86400).claim_next(worker, capacity, now=time.time())
        return job.id if job else None


def finish(factory: sessionmaker[Session], job_id: str, device_seconds: float = 10.0) -> None:
    with session_scope(factory) as session:
        values = {"device_seconds": device_seconds}
        assert transition(session, job_id, from_=JobStatus.RUNNING, to=JobStatus.SUCCEEDED, values=values)


def set_policy(factory: sessionmaker[Session], org: str, **policy: object) -> None:
    with session_scope(factory) as session:
        organization = session.get(Organization, org)
        if organization is None:
            organization = Organization(id=org, name=org, created_at=0)
            session.add(organization)
        for field, value in policy.items():
            setattr(organization, field, value)


def test_priority_first_then_age(session_factory: sessionmaker[Session]) -> None:
    low, high_old, high_new = queue(session_factory, "a", priority=1) + queue(
        session_factory, "a", priority=9, n=2
    )
    order = [claim(session_factory) for _ in range(3)]
    # One device: the second claim waits until the first job is done.
    assert order == [high_old, None, None]
    finish(session_factory, high_old)
    assert claim(session_factory) == high_new
    finish(session_factory, high_new)
    assert claim(session_factory) == low


def test_a_job_runs_only_on_a_worker_of_its_class_with_enough_devices(
    session_factory: sessionmaker[Session],
) -> None:
    (gpu_job,) = queue(session_factory, "a", device_class="a100")
    (wide_job,) = queue(session_factory, "a", devices=4)
    assert claim(session_factory, "cpu-worker", Capacity(2, "cpu")) is None  # neither fits
    assert claim(session_factory, "a100-worker", Capacity(2, "a100")) == gpu_job
    assert claim(session_factory, "big-cpu", Capacity(4, "cpu")) == wide_job
    with session_scope(session_factory) as session:
        assert Workers(session).known_classes() == {"cpu", "a100"}
        live = 60.0
        assert wait_reason(session, 4, "a100", now=time.time(), live_seconds=live) is not None
        assert wait_reason(session, 2, "a100", now=time.time(), live_seconds=live) is None
        assert wait_reason(session, 1, None, now=time.time(), live_seconds=live) is None


def test_fair_share_b_starts_before_a_second_job(session_factory: sessionmaker[Session]) -> None:
    """A queues 20 jobs, then B queues 2; equal weights: B's first starts no later than A's second."""
    a_jobs = queue(session_factory, "org-a", n=20)
    b_jobs = queue(session_factory, "org-b", n=2)
    started = []
    for _ in range(6):
        job_id = claim(session_factory)
        assert job_id is not None
        started.append(job_id)
        finish(session_factory, job_id)
    assert started.index(b_jobs[0]) <= started.index(a_jobs[1])
    assert set(b_jobs) <= set(started)


def test_fair_share_with_two_workers_at_once(session_factory: sessionmaker[Session]) -> None:
    """While A's job runs on one worker, the other worker starts B's, not A's next."""
    a_jobs = queue(session_factory, "org-a", n=20)
    b_jobs = queue(session_factory, "org-b", n=2)
    assert claim(session_factory, "w1") == a_jobs[0]
    assert claim(session_factory, "w2") == b_jobs[0]


def test_weights_divide_the_devices(session_factory: sessionmaker[Session]) -> None:
    set_policy(session_factory, "org-a", share_weight=1.0)
    set_policy(session_factory, "org-b", share_weight=3.0)
    queue(session_factory, "org-a", n=10)
    b_jobs = set(queue(session_factory, "org-b", n=10))
    started = [claim(session_factory, f"w{i}") for i in range(8)]
    assert sum(job in b_jobs for job in started) == 6  # 8 devices at 1:3


def test_per_class_device_cap(session_factory: sessionmaker[Session]) -> None:
    set_policy(session_factory, "org-a", device_caps={"a100": 2, "*": 5})
    a_jobs = queue(session_factory, "org-a", n=4)
    (b_job,) = queue(session_factory, "org-b")
    workers = [(f"g{i}", Capacity(1, "a100")) for i in range(4)]
    started = [claim(session_factory, worker, capacity) for worker, capacity in workers]
    assert started[:3] == [a_jobs[0], b_job, a_jobs[1]] and started[3] is None  # A is capped at 2 A100s
    assert claim(session_factory, "c1", Capacity(1, "cpu")) == a_jobs[2]  # the `*` cap is 5
    finish(session_factory, a_jobs[0])
    assert claim(session_factory, "g0", Capacity(1, "a100")) == a_jobs[3]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_racing_claimers_take_each_job_once_and_skip_none(session_factory: sessionmaker[Session]) -> None:
    jobs = set(queue(session_factory, "org-a", n=30) + queue(session_factory, "org-b", n=30))
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(worker: str) -> None:
        while True:
            job_id = claim(session_factory, worker)
            if job_id is None:
                return
            with lock:
                claimed.append(job_id)
            finish(session_factory, job_id, device_seconds=1.0)  # free the worker's device again

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(claimed) == len(set(claimed)) == len(jobs)
    assert set(claimed) == jobs


def test_a_job_no_worker_can_run_waits_with_one_event(session_factory: sessionmaker[Session]) -> None:
    (job_id,) = queue(session_factory, "a", devices=8)
    assert claim(session_factory, "w1", Capacity(2, "cpu")) is None
    for _ in range(3):
        with session_scope(session_factory) as session:
            Preemption(session, now=time.time(), live_seconds=60).note_waits()
    with session_scope(session_factory) as session:
        events = session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)).all()
        job = JobRepository(session).get(job_id)
        assert job is not None and job.status == "queued"
    assert len(events) == 1 and "8 device(s)" in events[0] and "2 cpu" in events[0]


def test_preemption_pauses_a_lower_priority_preemptible_job_and_resumes_it(
    session_factory: sessionmaker[Session],
) -> None:
    (victim,) = queue(session_factory, "a", priority=1, preemptible=True)
    (steady,) = queue(session_factory, "a", priority=1)
    assert claim(session_factory, "w1") == victim
    assert claim(session_factory, "w2") == steady
    (urgent,) = queue(session_factory, "b", priority=9)
    with session_scope(session_factory) as session:
        assert Preemption(session, now=time.time(), live_seconds=60).preempt() == [(victim, urgent)]
    with session_scope(session_factory) as session:  # a second sweep finds room: no more preemption
        assert Preemption(session, now=time.time(), live_seconds=60).preempt() == []
        assert Preemption(session, now=time.time(), live_seconds=60).resume_preempted() == []
    assert claim(session_factory, "w1") == urgent
    with session_scope(session_factory) as session:
        assert Preemption(session, now=time.time(), live_seconds=60).resume_preempted() == [(victim, None)]
        job = JobRepository(session).get(victim)
        assert job is not None and job.status == "queued" and job.preempted_by is None
        messages = session.scalars(select(JobEvent.message).where(JobEvent.job_id == victim)).all()
    assert any("Preempted" in m for m in messages) and any("Resumed after preemption" in m for m in messages)


def test_budget_refuses_creates_with_429(session_factory: sessionmaker[Session]) -> None:
    set_policy(session_factory, "org-a", monthly_device_hours=1.0)
    (job_id,) = queue(session_factory, "org-a")
    with session_scope(session_factory) as session:
        check_budget(session, "org-a", now=time.time())  # nothing used yet
    assert claim(session_factory) == job_id
    finish(session_factory, job_id, device_seconds=3600.0)
    with session_scope(session_factory) as session, pytest.raises(Exception) as refused:
        check_budget(session, "org-a", now=time.time())
    error = refused.value
    assert getattr(error, "status_code", None) == 429 and getattr(error, "code", None) == "quota_exceeded"
    assert getattr(error, "param", None) == "monthly_device_hours"


ADMIN = "sk-ftjadmin-scheduling-test-admin-key"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def admin_client(settings: Settings, tenant: Tenant) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"admin_key": SecretStr(ADMIN)}), RecordingDispatcher())
    with TestClient(app, raise_server_exceptions=False, headers=tenant.headers) as test_client:
        yield test_client


def test_bad_scheduling_input_is_a_400_naming_the_field_and_a_spent_budget_a_429(
    admin_client: TestClient,
    session_factory: sessionmaker[Session],
    registered_model: str,
    tenant: Tenant,
) -> None:
    client = admin_client
    with session_scope(session_factory) as session:
        Workers(session).register("w1", Capacity(2, "cpu"), now=time.time())
    base = {"model": registered_model, "training_file": upload(client, chat_lines(10))}
    for body, param in (
        ({"priority": 10}, "priority"),
        ({"priority": -1}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"preemptible": "yes"}, "preemptible"),
        ({"compute": {"device_class": "h100"}}, "compute.device_class"),
    ):
        assert_error(client.post("/v1/fine_tuning/jobs", json={**base, **body}), 400, param)
    created = client.post("/v1/fine_tuning/jobs", json={**base, "priority": 9, "preemptible": True})
    assert created.status_code == 200, created.text
    job = created.json()
    assert (job["priority"], job["preemptible"], job["usage"]) == (9, True, {"device_seconds": 0.0})
    cpu = client.post("/v1/fine_tuning/jobs", json={**base, "compute": {"device_class": "cpu"}})
    assert cpu.status_code == 200 and cpu.json()["priority"] == 5 and not cpu.json()["preemptible"]

    missing = client.post("/v1/admin/organizations/org-nope", json={"share_weight": 2}, headers=ADMIN_HEADERS)
    assert_error(missing, 400, "organization_id")
    path = f"/v1/admin/organizations/{tenant.id}"
    for body, param in (
        ({"share_weight": 0}, "share_weight"),
        ({"device_caps": {"a100": -1}}, "device_caps.a100"),
        ({"monthly_device_hours": -5}, "monthly_device_hours"),
    ):
        assert_error(client.post(path, json=body, headers=ADMIN_HEADERS), 400, param)
    policy = {"share_weight": 2.0, "device_caps": {"cpu": 1}, "monthly_device_hours": 0.0}
    updated = client.post(path, json=policy, headers=ADMIN_HEADERS).json()
    assert {key: updated[key] for key in policy} == policy and updated["device_hours_this_month"] == 0
    assert updated["storage_quota_bytes"] is None  # untouched
    refused = client.post("/v1/fine_tuning/jobs", json=base)
    assert_error(refused, 429, "monthly_device_hours", code="quota_exceeded")
    assert "ftjobs_organization_device_seconds" in client.get("/metrics").text


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_preemption_round_trip_resumes_exactly(
    client: TestClient,
    settings: Settings,
    session_factory: sessionmaker[Session],
    registered_model: str,
    dispatcher: RecordingDispatcher,
) -> None:
    """A preemptible job is paused for a priority-9 job through the pause path, the urgent job runs, and the
    preempted one resumes by itself from its checkpoint and ends with the adapter of an uninterrupted run."""
    fast = settings.model_copy(update={"heartbeat_seconds": 0.1})
    runner = JobRunner(fast, session_factory, LocalArtifactStore(settings.artifacts_root))
    reconciler = Reconciler(fast, session_factory, dispatcher)
    train = chat_lines(30)

    def create(priority: int, preemptible: bool, n_epochs: int) -> str:
        hyper = {**FAST, "n_epochs": n_epochs, "batch_size": 1}
        body = {
            "model": registered_model,
            "seed": 11,
            "training_file": upload(client, train),
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
            "priority": priority,
            "preemptible": preemptible,
        }
        response = client.post("/v1/fine_tuning/jobs", json=body)
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def events(job_id: str) -> list[dict[str, Any]]:
        url = f"/v1/fine_tuning/jobs/{job_id}/events"
        return list(reversed(client.get(url, params={"limit": 1000}).json()["data"]))

    straight = create(1, False, 4)
    runner.run(straight)
    victim = create(1, True, 4)
    thread = threading.Thread(target=runner.run, args=(victim,))
    thread.start()
    wait_for(lambda: any(e["type"] == "metrics" for e in events(victim)), 120, "training")
    urgent = create(9, False, 1)
    assert reconciler.sweep().preempted == [victim]
    thread.join(timeout=60)
    assert not thread.is_alive() and client.get(f"/v1/fine_tuning/jobs/{victim}").json()["status"] == "paused"
    pause_step = client.get(f"/v1/fine_tuning/jobs/{victim}/checkpoints").json()["data"][0]["step_number"]

    runner.run(urgent)  # its wake-up: the urgent job runs first, the preempted one is still paused
    assert client.get(f"/v1/fine_tuning/jobs/{urgent}").json()["status"] == "succeeded"
    assert client.get(f"/v1/fine_tuning/jobs/{victim}").json()["status"] == "paused"
    reconciler.sweep()  # the urgent job has started: the preempted one is queued again
    runner.run(victim)
    job = client.get(f"/v1/fine_tuning/jobs/{victim}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["usage"]["device_seconds"] > 0
    messages = [e["message"] for e in events(victim)]
    assert any(m.startswith(f"Preempted: paused at a checkpoint for job {urgent}") for m in messages)
    assert any(m.startswith("Resumed after preemption") for m in messages)
    assert any(f"resumed from step {pause_step}" in m for m in messages)
    final, reference = adapter_tensors(settings, victim, 2), adapter_tensors(settings, straight, 1)
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=1e-5)
