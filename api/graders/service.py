"""Graders for an organisation: a grader's judge models must be ones it can call (its own or a base), and
every refusal is a 400 naming the field."""

from dataclasses import asdict

from sqlalchemy.orm import Session

from api.graders.schemas import GraderRun, GraderRunResult, RunErrors, RunMetadata
from graders import grading
from graders.errors import GraderError
from graders.shapes import AnyGrader, LabelModelGrader, MultiGrader, ScoreModelGrader, sub_graders
from models.errors import APIError
from models.versions import ModelVersions


def validate(session: Session, org: str, grader: AnyGrader) -> None:
    try:
        grading.check(grader)
    except GraderError as error:
        raise APIError(error.message, param=error.param, code="invalid_grader") from error
    _check_judges(session, org, grader, "grader")


def run(session: Session, org: str, body: GraderRun) -> GraderRunResult:
    validate(session, org, body.grader)
    try:
        result = grading.grade(body.grader, body.model_sample, body.item)
    except GraderError as error:
        raise APIError(error.message, param=error.param, code="invalid_grader") from error
    scores = dict(result.sub_rewards) or {result.name: result.reward}
    return GraderRunResult(
        reward=result.reward,
        metadata=RunMetadata(
            errors=RunErrors(**asdict(result.errors)),
            execution_time=result.execution_time,
            name=result.name,
            sampled_model_name=None,
            scores=scores,
            token_usage=None,
            type=result.type,
        ),
        sub_rewards=result.sub_rewards,
        model_grader_token_usage_per_model={},
    )


def _check_judges(session: Session, org: str, grader: AnyGrader, param: str) -> None:
    if isinstance(grader, MultiGrader):
        for name, sub in sub_graders(grader).items():
            _check_judges(session, org, sub, f"{param}.graders.{name}")
    elif isinstance(grader, ScoreModelGrader | LabelModelGrader):
        if ModelVersions(session).get(org, grader.model) is None:
            raise APIError(
                f"The judge model {grader.model!r} does not exist or you do not have access to it.",
                param=f"{param}.model",
                code="model_not_found",
            )
