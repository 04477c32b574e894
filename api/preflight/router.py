from fastapi import APIRouter

from api.deps import OrgDep, SessionDep, SettingsDep, StoreDep
from api.inference.router import ClientDep
from api.jobs.schemas import JobCreate
from api.preflight import service
from api.preflight.schemas import Preflight

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


@router.post("/preflight")
def preflight(
    body: JobCreate,
    session: SessionDep,
    store: StoreDep,
    client: ClientDep,
    settings: SettingsDep,
    org: OrgDep,
) -> Preflight:
    """Extension: what a job created with this body would train on, need and take, before anything runs
    (counts, truncation, a loss-mask preview, memory, duration). Nothing is created."""
    return service.estimate(session, store, client, settings, org, body)
