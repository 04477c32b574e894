"""OpenAI's grader routes (`client.fine_tuning.alpha.graders.validate|run`)."""

from fastapi import APIRouter

from api.deps import OrgDep, SessionDep, StoreDep
from api.graders import service
from api.graders.schemas import GraderRun, GraderRunResult, GraderValidate, GraderValidated
from api.inference.router import ClientDep

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["graders"])


@router.post("/validate")
def validate(body: GraderValidate, session: SessionDep, store: StoreDep, org: OrgDep) -> GraderValidated:
    """Check a grader: its templates, formula, python source and judge models; the grader comes back."""
    service.validate(session, store, org, body.grader)
    return GraderValidated(grader=body.grader)


@router.post("/run")
def run(
    body: GraderRun, session: SessionDep, store: StoreDep, client: ClientDep, org: OrgDep
) -> GraderRunResult:
    """Grade one model sample against a dataset item: a python grader runs in a sandbox, a model grader
    asks its judge model on the inference server."""
    return service.run(session, store, client, org, body)
