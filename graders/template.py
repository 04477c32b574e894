"""`{{ item.FIELD }}` and `{{ sample.output_text }}` substitution: a placeholder is a dotted path into the
item or the sample, nothing else (no expressions, filters or code), so a template cannot run anything."""

import json
import re
from typing import Any

from graders.errors import GraderError

PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}")
PATH = re.compile(r"(item|sample)(\.[^.\s{}]+)+")
SAMPLE_FIELDS = ("output_text", "output_json")


def paths(template: str, param: str) -> list[str]:
    """The template's placeholders as paths; GraderError names one that is not a path into item or sample."""
    found = [match.strip() for match in PLACEHOLDER.findall(template)]
    for path in found:
        if not PATH.fullmatch(path):
            raise GraderError(
                f"The template placeholder {{{{{path}}}}} is not a path into the item or the sample "
                "(e.g. {{item.answer}}, {{sample.output_text}}, {{sample.output_json.FIELD}}).",
                param,
            )
        parts = path.split(".")
        if parts[0] == "sample" and parts[1] not in SAMPLE_FIELDS:
            raise GraderError(
                f"The template names {path!r}; the sample has {' and '.join(SAMPLE_FIELDS)}.", param
            )
    return found


def sample_namespace(model_sample: str) -> dict[str, Any]:
    """What `sample.` names: the output text, and its JSON when it parses."""
    try:
        output_json = json.loads(model_sample)
    except ValueError:
        output_json = None
    return {"output_text": model_sample, "output_json": output_json}


def render(template: str, namespaces: dict[str, Any], param: str) -> str:
    """Substitute each placeholder's value (text as is, anything else as JSON); GraderError names a path
    the item or the sample does not have."""
    paths(template, param)

    def value(match: re.Match[str]) -> str:
        path = match.group(1).strip()
        found = lookup(namespaces, path.split("."))
        if found is MISSING:
            raise GraderError(
                f"The template names {path!r}, which the item or the sample does not have.", param
            )
        return found if isinstance(found, str) else json.dumps(found)

    return PLACEHOLDER.sub(value, template)


MISSING = object()


def lookup(value: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return MISSING
    return value
