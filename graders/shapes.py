"""OpenAI's grader objects, field by field as the openai SDK types them (`types/graders/*.py`). Unknown keys
are refused, so a misspelt field is an error rather than silently ignored."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StringCheckGrader(Shape):
    type: Literal["string_check"]
    name: str
    input: str
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]


SimilarityMetric = Literal[
    "cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5",
    "rouge_l",
]  # fmt: skip


class TextSimilarityGrader(Shape):
    type: Literal["text_similarity"]
    name: str
    input: str
    reference: str
    evaluation_metric: SimilarityMetric


class PythonGrader(Shape):
    type: Literal["python"]
    name: str
    source: str
    image_tag: str | None = None


class InputText(Shape):
    type: Literal["input_text"]
    text: str


class OutputText(Shape):
    type: Literal["output_text"]
    text: str


TextContent = Annotated[InputText | OutputText, Field(discriminator="type")]
# Judges here are text models: image and audio parts are refused as unknown content types.


class JudgeMessage(Shape):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | TextContent | list[str | TextContent]
    type: Literal["message"] | None = None


class SamplingParams(Shape):
    max_completions_tokens: int | None = None
    reasoning_effort: str | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None


class ScoreModelGrader(Shape):
    type: Literal["score_model"]
    name: str
    model: str
    input: list[JudgeMessage]
    range: list[float] | None = None
    sampling_params: SamplingParams | None = None


class LabelModelGrader(Shape):
    type: Literal["label_model"]
    name: str
    model: str
    input: list[JudgeMessage]
    labels: list[str]
    passing_labels: list[str]


SubGrader = Annotated[
    StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | LabelModelGrader,
    Field(discriminator="type"),
]


class MultiGrader(Shape):
    type: Literal["multi"]
    name: str
    calculate_output: str
    # OpenAI's API takes a map of name to grader (the names the formula uses); the SDK types one grader,
    # which is taken as a map of one under its own name.
    graders: dict[str, SubGrader] | SubGrader


Grader = Annotated[
    StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | MultiGrader,
    Field(discriminator="type"),
]
ModelGrader = ScoreModelGrader | LabelModelGrader
AnyGrader = (
    StringCheckGrader
    | TextSimilarityGrader
    | PythonGrader
    | ScoreModelGrader
    | LabelModelGrader
    | MultiGrader
)


def sub_graders(grader: MultiGrader) -> dict[str, SubGrader]:
    return grader.graders if isinstance(grader.graders, dict) else {grader.graders.name: grader.graders}


_GRADER: TypeAdapter[Grader] = TypeAdapter(Grader)


def parse_grader(data: Any) -> AnyGrader:
    """A grader from its JSON shape (as a job stores it); pydantic's ValidationError when it is not one."""
    return _GRADER.validate_python(data)
