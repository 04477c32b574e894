"""Inference requests (OpenAI's chat completions, completions, and our classifications) and what the API
tells the inference server about the model they name.

The API validates a request (so bad input is a 400 in OpenAI's envelope before anything loads), resolves
its `model` through the registry into a `Target` and forwards both; the inference server (`ftjobs serve`)
needs no database, only the artifact store and the base models' directories.
"""

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

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


MAX_LOGIT_BIAS = 300
"""Entries of one request's `logit_bias`."""
MAX_TOP_LOGPROBS = 20
"""Alternatives per token in chat's `top_logprobs` (OpenAI's bound); completions' `logprobs` goes to 5."""
MAX_SCHEMA_CHARACTERS = 64 * 1024
"""Characters of a `response_format` JSON schema, as JSON: compiled once per request."""


def _refuse(value: object) -> object:
    if value is not None:
        raise ValueError("this parameter is not supported by this server")
    return value


Unsupported = Annotated[Any, AfterValidator(_refuse)]
"""A parameter of OpenAI's this server does not implement: a 400 naming it when given (null is not)."""


class InferenceRequest(BaseModel):
    # An unknown key is a 400 naming it, as OpenAI answers one: nothing a caller sends is silently ignored.
    # The openai client sends only what the caller set.
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    # Accepted and not acted on: who the end user is, for the caller's own abuse tracking.
    user: str | None = None


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
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: (
        Annotated[dict[int, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=MAX_LOGIT_BIAS)]
        | None
    ) = None
    """Token id (a string in JSON) to a bias added to its logit; checked against the vocabulary once the
    model is known."""

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
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    """Accepted; chat templates have no place for it."""
    refusal: str | None = None
    """An earlier assistant turn's refusal, as the openai client echoes it back; not rendered."""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object"]


class JSONSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    """The JSON schema the answer follows; none (or {}) admits any JSON value."""
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(schema)) > MAX_SCHEMA_CHARACTERS:
            raise ValueError(f"the schema must be at most {MAX_SCHEMA_CHARACTERS} characters as JSON")
        return schema


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]
_response_formats: TypeAdapter[ResponseFormat] = TypeAdapter(ResponseFormat)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    # Accepted and not acted on: nothing is stored (so `store` may only be false), and every request
    # is served at one tier.
    store: Literal[False] | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    service_tier: Literal["auto", "default"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # OpenAI's, not implemented here: a 400 naming the parameter.
    tools: Unsupported = None
    tool_choice: Unsupported = None
    parallel_tool_calls: Unsupported = None
    functions: Unsupported = None
    function_call: Unsupported = None
    audio: Unsupported = None
    modalities: Unsupported = None
    prediction: Unsupported = None
    web_search_options: Unsupported = None
    reasoning_effort: Unsupported = None
    verbosity: Unsupported = None

    @field_validator("messages")
    @classmethod
    def _bounded_messages(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        prompt_characters([m.text() for m in messages], "messages")
        return messages

    @field_validator("response_format", mode="before")
    @classmethod
    def _one_response_format(cls, value: object) -> object:
        """Parsed here so that an error names `response_format` and says where in it, without the tag
        pydantic adds to a discriminated union's error locations."""
        if value is None:
            return None
        try:
            return _response_formats.validate_python(value)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(map(str, first["loc"][1:]))
            raise ValueError(f"{where}: {first['msg']}" if where else first["msg"]) from None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_with_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top

    def logprob_alternatives(self) -> int | None:
        """None: no logprobs; else how many alternatives each token lists."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def json_schema(self) -> dict[str, Any] | None:
        """The schema the answer must follow (json_object: any object), or None for free text."""
        if isinstance(self.response_format, JSONObjectFormat):
            return {"type": "object"}
        if isinstance(self.response_format, JSONSchemaFormat):
            return self.response_format.json_schema.schema_
        return None

    def token_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    """How many alternatives each token lists beside its own log probability."""
    # Their neutral values are accepted (some clients send them); anything else is not implemented here.
    echo: Literal[False] | None = None
    best_of: Literal[1] | None = None
    suffix: Unsupported = None

    def logprob_alternatives(self) -> int | None:
        return self.logprobs

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
