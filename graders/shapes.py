"""OpenAI's grader objects, field by field as the openai SDK types them (`types/graders/*.py`). Unknown keys
are refused, so a misspelt field is an error rather than silently ignored."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class StringCheckGrader(Shape):
    type: Literal["string_check"]
    """Compares the answer with a reference string."""
    name: str
    """The grader's name (in results and multi formulas)."""
    input: str
    """Template of the text checked, e.g. `{{sample.output_text}}`."""
    reference: str
    """Template of the reference, e.g. `{{item.answer}}`."""
    operation: Literal["eq", "ne", "like", "ilike"]
    """eq, ne, like (contains) or ilike (contains, ignoring case)."""


SimilarityMetric = Literal[
    "cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5",
    "rouge_l",
]  # fmt: skip


class TextSimilarityGrader(Shape):
    type: Literal["text_similarity"]
    """Scores how similar the answer is to a reference."""
    name: str
    """The grader's name (in results and multi formulas)."""
    input: str
    """Template of the text scored, e.g. `{{sample.output_text}}`."""
    reference: str
    """Template of the reference, e.g. `{{item.answer}}`."""
    evaluation_metric: SimilarityMetric
    """The similarity measure (0 to 1)."""


class PythonGrader(Shape):
    type: Literal["python"]
    """Runs the user's `grade(sample, item)` in the sandbox."""
    name: str
    """The grader's name (in results and multi formulas)."""
    source: str
    """Python source defining `grade(sample, item) -> float`."""
    image_tag: str | None = None
    """Accepted for compatibility; the sandbox's interpreter runs the code."""


class InputText(Shape):
    type: Literal["input_text"]
    """A text part."""
    text: str
    """The text (a template)."""


class OutputText(Shape):
    type: Literal["output_text"]
    """A text part of an assistant message."""
    text: str
    """The text (a template)."""


TextContent = Annotated[InputText | OutputText, Field(discriminator="type")]
# Judges here are text models: image and audio parts are refused as unknown content types.


class JudgeMessage(Shape):
    role: Literal["user", "assistant", "system", "developer"]
    """Who says it."""
    content: str | TextContent | list[str | TextContent]
    """The message's text or text parts (templates)."""
    type: Literal["message"] | None = None
    """Always `message` when given."""


class SamplingParams(Shape):
    max_completions_tokens: int | None = None
    """The longest reply the judge may give."""
    reasoning_effort: str | None = None
    """Accepted for compatibility; served judges do not reason."""
    seed: int | None = None
    """The judge's sampling seed."""
    temperature: float | None = None
    """The judge's sampling temperature."""
    top_p: float | None = None
    """The judge's nucleus sampling mass."""


class ScoreModelGrader(Shape):
    type: Literal["score_model"]
    """A served model scores the answer."""
    name: str
    """The grader's name (in results and multi formulas)."""
    model: str
    """The judge: a model this organisation can call."""
    input: list[JudgeMessage]
    """The judge's messages (templates)."""
    range: list[float] | None = None
    """The lowest and highest score (default 0 to 1)."""
    sampling_params: SamplingParams | None = None
    """How the judge samples its reply."""


class LabelModelGrader(Shape):
    type: Literal["label_model"]
    """A served model labels the answer."""
    name: str
    """The grader's name (in results and multi formulas)."""
    model: str
    """The judge: a model this organisation can call."""
    input: list[JudgeMessage]
    """The judge's messages (templates)."""
    labels: list[str]
    """The labels the judge chooses from."""
    passing_labels: list[str]
    """The labels that score 1 (the others score 0)."""


SubGrader = Annotated[
    StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | LabelModelGrader,
    Field(discriminator="type"),
]


class MultiGrader(Shape):
    type: Literal["multi"]
    """Combines named sub-graders with a formula."""
    name: str
    """The grader's name."""
    calculate_output: str
    """The formula over the sub-graders' names (+ - * / **, min, max, ...)."""
    # OpenAI's API takes a map of name to grader (the names the formula uses); the SDK types one grader,
    # which is taken as a map of one under its own name.
    graders: dict[str, SubGrader] | SubGrader
    """The sub-graders by name (or one grader, named by its own name)."""


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
