"""Inference requests (OpenAI's chat completions, completions, and our classifications) and what the API
tells the inference server about the model they name.

The API validates a request (so bad input is a 400 in OpenAI's envelope before anything loads), resolves
its `model` through the registry into a `Target` and forwards both; the inference server (`ftjobs serve`)
needs no database, only the artifact store and the base models' directories.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ModelKind = Literal["causal_lm", "classification"]


class Target(BaseModel):
    """A servable model: a base model's directory, and the artifact trained on it (None: the base itself)."""

    model: str
    """The name the request used, echoed in responses."""
    base_path: str
    artifact_key: str | None = None
    """Artifact-store key of the adapter, checkpoint or other artifact (it holds its `lineage.json`)."""
    method: str | None = None
    """The training_type that made the artifact: says how it is applied to the base."""
    kind: ModelKind = "causal_lm"


class InferenceRequest(BaseModel):
    # The openai client sends only what the caller set; unknown fields are ignored as OpenAI ignores them.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)


MIN_TEMPERATURE = 1e-5
"""Below this (but 0, greedy) logits divided by the temperature overflow float32 and sampling fails."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""What a torch generator accepts as a seed."""


class _Sampling(InferenceRequest):
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stream: bool | None = None
    stream_options: dict[str, bool] | None = None

    @field_validator("temperature")
    @classmethod
    def _greedy_or_above_the_floor(cls, temperature: float | None) -> float | None:
        if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
            raise ValueError(f"the temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return temperature

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop == "" or (isinstance(stop, list) and "" in stop):
            raise ValueError("stop sequences must not be empty")
        return stop

    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def token_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class ClassificationRequest(InferenceRequest):
    """Extension: label texts with a fine-tuned classifier."""

    input: str | Annotated[list[str], Field(min_length=1)]

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class Forwarded(BaseModel):
    """The body the API posts to the inference server."""

    target: Target
    request: dict[str, object]
    """The request as validated, re-validated by the server into its own type."""
