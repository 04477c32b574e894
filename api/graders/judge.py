"""The judge of model graders: a chat completion from the inference server, as the API's inference routes
ask for one (the model resolved within the caller's organisation), but read whole rather than relayed."""

import httpx
from pydantic import ValidationError
from sqlalchemy.orm import Session

from graders import judging
from graders.judging import Judge, Reply
from graders.shapes import SamplingParams
from models.errors import APIError, not_found
from models.inference import ChatCompletionRequest
from models.storage import ArtifactStore
from models.targets import target
from models.versions import ModelVersions


def chat_request(
    model: str, messages: list[dict[str, str]], sampling: SamplingParams | None, param: str
) -> ChatCompletionRequest:
    """The judge's request; a sampling parameter the server cannot take is a 400 naming it."""
    try:
        return ChatCompletionRequest.model_validate(judging.request(model, messages, sampling))
    except ValidationError as error:
        field = str(error.errors()[0]["loc"][0]).replace("max_completion_tokens", "max_completions_tokens")
        raise APIError(
            f"sampling_params.{field}: {error.errors()[0]['msg']}", param=f"{param}.sampling_params.{field}"
        ) from error


def judge(session: Session, store: ArtifactStore, client: httpx.Client, org: str) -> Judge:
    """A judge that asks the inference server for the organisation."""

    def ask(model: str, messages: list[dict[str, str]], sampling: SamplingParams | None) -> Reply:
        version = ModelVersions(session).get(org, model)
        if version is None:  # validated before grading; deleted since
            raise not_found("model", model, "grader.model")
        request = chat_request(model, messages, sampling, "grader").model_dump(exclude_none=True)
        return judging.ask(client, target(store, version).model_dump(mode="json"), org, request)

    return ask
