"""Request and response bodies of `client.fine_tuning.alpha.graders.run|validate`, as the openai SDK types
them (`types/fine_tuning/alpha/grader_*.py`); the grader objects themselves are `graders.shapes`."""

from typing import Any

from pydantic import BaseModel, ConfigDict

from graders.grading import Errors
from graders.shapes import Grader


class GraderValidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: Grader


class GraderRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: Grader
    model_sample: str
    item: Any = None


class GraderValidated(BaseModel):
    grader: Grader


class RunMetadata(BaseModel):
    errors: Errors  # OpenAI's flags, as graders.grading sets them
    execution_time: float
    name: str
    sampled_model_name: str | None
    scores: dict[str, float]
    token_usage: int | None
    type: str


class GraderRunResult(BaseModel):
    reward: float
    metadata: RunMetadata
    sub_rewards: dict[str, float]
    model_grader_token_usage_per_model: dict[str, dict[str, int]]
