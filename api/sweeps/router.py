from typing import Annotated, Any

from fastapi import APIRouter
from sqlalchemy.orm import Session

from api.deps import DispatcherDep, OrgDep, SessionDep, SettingsDep, StoreDep
from api.idempotency import IdempotencyDep
from api.pagination import After, Limit, ListPage, list_page
from api.sweeps import service
from api.sweeps.schemas import FineTuningSweep, SweepCreate
from models.orm import Sweep
from models.sweeps import views

router = APIRouter(prefix="/v1/fine_tuning/sweeps", tags=["fine-tuning"])


def _trial_jobs(
    settings: SettingsDep, store: StoreDep, dispatcher: DispatcherDep
) -> service.ServiceTrialJobs:
    return service.ServiceTrialJobs(settings, store, dispatcher)


def _render(session: Session, sweep: Sweep) -> FineTuningSweep:
    return FineTuningSweep.of(sweep, views(session, sweep))


@router.post("", response_model=FineTuningSweep)
def create_sweep(
    body: SweepCreate,
    session: SessionDep,
    store: StoreDep,
    dispatcher: DispatcherDep,
    org: OrgDep,
    idempotency: IdempotencyDep,
    settings: SettingsDep,
) -> Any:
    """Extension: search a job's hyperparameters with trials that are ordinary jobs (docs/api.md#sweeps)."""
    jobs = _trial_jobs(settings, store, dispatcher)
    return idempotency.run(
        lambda: body.model_dump_json().encode(),
        lambda: _render(session, service.create(session, jobs, org, body)),
    )


@router.get("")
def list_sweeps(
    session: SessionDep, org: OrgDep, after: After = None, limit: Annotated[int, Limit(100)] = 20
) -> ListPage[FineTuningSweep]:
    """Extension: list sweeps, newest first."""
    rows, has_more = service.list_sweeps(session, org, after=after, limit=limit)
    return list_page(rows, has_more, lambda sweep: _render(session, sweep))


@router.get("/{sweep_id}")
def retrieve_sweep(sweep_id: str, session: SessionDep, org: OrgDep) -> FineTuningSweep:
    """Extension: a sweep, its trials and its best trial so far."""
    return _render(session, service.get(session, org, sweep_id))


@router.post("/{sweep_id}/cancel", response_model=FineTuningSweep)
def cancel_sweep(
    sweep_id: str,
    session: SessionDep,
    store: StoreDep,
    dispatcher: DispatcherDep,
    org: OrgDep,
    idempotency: IdempotencyDep,
    settings: SettingsDep,
) -> Any:
    """Extension: cancel a sweep's unfinished trials; finished trials and the best so far stay."""
    jobs = _trial_jobs(settings, store, dispatcher)
    return idempotency.run(
        lambda: b"", lambda: _render(session, service.cancel(session, jobs, org, sweep_id))
    )
