"""The judge of model graders: a chat completion from the inference server, as the API's inference routes
ask for one (the model resolved within the caller's organisation), but read whole rather than relayed."""

from typing import Any

import httpx
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.registry import service as model_service
from graders.judging import Judge, Reply
from graders.shapes import SamplingParams
from models.errors import APIError, not_found
from models.inference import ChatCompletionRequest, Forwarded
from models.storage import ArtifactStore
from models.versions import ModelVersions

JUDGE_MAX_TOKENS = 64
"""A judge's answer is a score or a label: unless the grader asks for more, it need not be long."""


def chat_request(
    model: str, messages: list[dict[str, str]], sampling: SamplingParams | None, param: str
) -> ChatCompletionRequest:
    """The judge's request; a sampling parameter the server cannot take is a 400 naming it."""
    given = sampling or SamplingParams()
    try:
        return ChatCompletionRequest(
            model=model,
            messages=messages,  # pyright: ignore[reportArgumentType] (validated into ChatMessage)
            temperature=given.temperature,
            top_p=given.top_p,
            seed=given.seed,
            max_completion_tokens=(
                JUDGE_MAX_TOKENS if given.max_completions_tokens is None else given.max_completions_tokens
            ),
        )
    except ValidationError as error:
        field = str(error.errors()[0]["loc"][0]).replace("max_completion_tokens", "max_completions_tokens")
        raise APIError(
            f"sampling_params.{field}: {error.errors()[0]['msg']}", param=f"{param}.sampling_params.{field}"
        ) from error


def judge(session: Session, store: ArtifactStore, client: httpx.Client, org: str) -> Judge:
    """A judge that asks the inference server; an unreachable or failing server is the reply's error."""

    def ask(model: str, messages: list[dict[str, str]], sampling: SamplingParams | None) -> Reply:
        version = ModelVersions(session).get(org, model)
        if version is None:  # validated before grading; deleted since
            raise not_found("model", model, "grader.model")
        request = chat_request(model, messages, sampling, "grader")
        payload = Forwarded(
            target=model_service.target(store, version), request=request.model_dump(exclude_none=True)
        )
        try:
            response = client.post("/internal/chat/completions", json=payload.model_dump(mode="json"))
        except httpx.TransportError as error:
            return Reply(None, error=f"the inference server is not reachable ({type(error).__name__})")
        body: dict[str, Any] = response.json()
        if response.status_code != 200:
            message = body.get("error", {}).get("message", response.text[:300])
            return Reply(None, error=f"the judge model's server answered {response.status_code}: {message}")
        usage = {
            key: int(value) for key, value in (body.get("usage") or {}).items() if isinstance(value, int)
        }
        return Reply(body["choices"][0]["message"]["content"] or "", usage)

    return ask
