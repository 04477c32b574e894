"""Inference requests (OpenAI's chat completions, completions, and our classifications) and what the API
tells the inference server about the model they name.

The API validates a request (so bad input is a 400 in OpenAI's envelope before anything loads), resolves
its `model` through the registry into a `Target` and forwards both; the inference server (`ftjobs serve`)
needs no database, only the artifact store and the base models' directories.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

ModelKind = Literal["causal_lm", "classification"]

# The work one request may ask for (finding 1 of the security review): every request shares its base's batch.
MAX_PROMPTS = 64
"""Prompts in a completions `prompt` list, texts in a classifications `input` list."""
MAX_MESSAGES = 256
MAX_N = 16
MAX_CHOICES = 64
"""`n` times the number of prompts: the rows one request adds to its base's batch."""
MAX_STOP = 4
MAX_STOP_LENGTH = 256
"""Characters of one stop string."""
MAX_PROMPT_TOKENS = 16_384
"""Prompt tokens of one request, all its prompts together (checked exactly once tokenized)."""
MAX_PROMPT_CHARACTERS = 16 * MAX_PROMPT_TOKENS
"""Characters of one request's prompts or texts, all together: checked before anything is tokenized."""


def prompt_characters(texts: list[str], param: str) -> None:
    if sum(map(len, texts)) > MAX_PROMPT_CHARACTERS:
        raise ValueError(f"{param} must total at most {MAX_PROMPT_CHARACTERS} characters")


class Target(BaseModel):
    """A servable model: a base model's directory, and the artifact trained on it (None: the base itself)."""

    model: str
    """The name the request used, echoed in responses."""
    base_path: str
    """Where the base was registered; with object storage the server reads it by `base_content_hash`."""
    base_content_hash: str | None = None
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
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
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
        if any(len(s) > MAX_STOP_LENGTH for s in ([stop] if isinstance(stop, str) else stop or [])):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_LENGTH} characters long")
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
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    @field_validator("messages")
    @classmethod
    def _bounded_messages(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        prompt_characters([m.text() for m in messages], "messages")
        return messages

    def token_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None

    @field_validator("prompt")
    @classmethod
    def _bounded_prompt(cls, prompt: str | list[str], info: ValidationInfo) -> str | list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        prompt_characters(prompts, "prompt")
        if (info.data.get("n") or 1) * len(prompts) > MAX_CHOICES:
            raise ValueError(f"n times the number of prompts must be at most {MAX_CHOICES}")
        return prompt

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class ClassificationRequest(InferenceRequest):
    """Extension: label texts with a fine-tuned classifier."""

    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]

    @field_validator("input")
    @classmethod
    def _bounded_input(cls, texts: str | list[str]) -> str | list[str]:
        prompt_characters([texts] if isinstance(texts, str) else texts, "input")
        return texts

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class Forwarded(BaseModel):
    """The body the API posts to the inference server."""

    target: Target
    request: dict[str, object]
    """The request as validated, re-validated by the server into its own type."""
    organization: str = ""
    """Whose request it is: batches are fair between organisations."""
