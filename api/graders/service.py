"""Graders for an organisation: a grader's judge models must be ones it can call (its own or a base) that
answer in chat, and every refusal is a 400 naming the field."""

import httpx
from sqlalchemy.orm import Session

from api.graders.judge import chat_request, judge
from api.graders.schemas import GraderRun, GraderRunResult, RunMetadata
from graders import grading
from graders.errors import GraderError
from graders.shapes import AnyGrader, ScoreModelGrader
from models.errors import APIError
from models.storage import ArtifactStore
from models.targets import judge_targets


def validate(
    session: Session, store: ArtifactStore, org: str, grader: AnyGrader, param: str = "grader"
) -> None:
    try:
        grading.check(grader, param)
    except GraderError as error:
        raise APIError(error.message, param=error.param, code="invalid_grader") from error
    judge_targets(session, store, org, grader, param)
    for where, judge_grader in grading.model_graders(grader, param):
        sampling = judge_grader.sampling_params if isinstance(judge_grader, ScoreModelGrader) else None
        chat_request(judge_grader.model, [{"role": "user", "content": "-"}], sampling, where)


def run(
    session: Session, store: ArtifactStore, client: httpx.Client, org: str, body: GraderRun
) -> GraderRunResult:
    validate(session, store, org, body.grader)
    try:
        result = grading.grade(body.grader, body.model_sample, body.item, judge(session, store, client, org))
    except GraderError as error:
        raise APIError(error.message, param=error.param, code="invalid_grader") from error
    scores = dict(result.sub_rewards) or {result.name: result.reward}
    tokens = [usage["total_tokens"] for usage in result.token_usage.values() if "total_tokens" in usage]
    return GraderRunResult(
        reward=result.reward,
        metadata=RunMetadata(
            errors=result.errors,
            execution_time=result.execution_time,
            name=result.name,
            sampled_model_name=None,
            scores=scores,
            token_usage=sum(tokens) if tokens else None,
            type=result.type,
        ),
        sub_rewards=result.sub_rewards,
        model_grader_token_usage_per_model=dict(result.token_usage),
    )
