"""The multi grader's `calculate_output`, evaluated by simpleeval (never `eval`): numbers, the sub-graders'
names, + - * / ** and a few math functions; anything else is refused."""

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from simpleeval import SimpleEval, safe_power

from graders.errors import GraderError

FUNCTIONS: dict[str, Callable[..., Any]] = {
    "min": min,
    "max": max,
    "abs": abs,
    "sqrt": math.sqrt,
    "log": math.log,
    "exp": math.exp,
    "floor": math.floor,
    "ceil": math.ceil,
}
OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: safe_power,  # refuses huge powers, so a formula cannot exhaust memory
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}

ALLOWED_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Call,
    ast.Name,
    ast.Constant,
    ast.Load,
    *OPERATORS,
)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check(formula: str, names: set[str], param: str) -> None:
    """GraderError if `formula` does not parse or names something that is neither a sub-grader nor one of
    the functions."""
    try:
        tree = ast.parse(formula.strip(), mode="eval")
    except SyntaxError as error:
        raise GraderError(f"calculate_output does not parse: {error.msg}.", param) from error
    for node in ast.walk(tree):
        if not isinstance(node, ALLOWED_NODES) or (
            isinstance(node, ast.Constant) and not _number(node.value)
        ):
            raise GraderError(
                f"calculate_output may hold only numbers, names, + - * / ** and function calls, not "
                f"{ast.unparse(node) if isinstance(node, ast.expr) else type(node).__name__!r}.",
                param,
            )
    unknown = sorted(
        {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} - names - set(FUNCTIONS)
    )
    if unknown:
        raise GraderError(
            f"calculate_output names {', '.join(unknown)}: only the graders ({', '.join(sorted(names))}) "
            f"and {', '.join(FUNCTIONS)} may be used.",
            param,
        )


def evaluate(formula: str, values: dict[str, float]) -> float:
    """The formula's value; ValueError (or ArithmeticError) when it has none, e.g. a division by zero."""
    result = SimpleEval(operators=OPERATORS, functions=FUNCTIONS, names=values).eval(formula.strip())
    if not _number(result) or not math.isfinite(result):
        raise ValueError(f"calculate_output gave {result!r}, not a finite number")
    return float(result)
