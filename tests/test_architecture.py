"""Import boundaries. Statically, from the source (every import, a function's lazy ones too): the API never
imports torch or the inference server, the inference server never imports the API, the training child's code
takes only `models.spec` of the domain, `models/` knows no web and no training, and `web/` (shared by both
HTTP apps) neither of them. At run time: neither the API nor the worker parent (Celery, embedded dispatcher)
loads torch; the training child loading no service code is tests/training/test_import_hygiene.py."""

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "transformers", "peft"]


@dataclass(frozen=True)
class Rule:
    directory: str
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()


RULES = [
    Rule("api", (*HEAVY, "inference")),
    Rule("inference", ("api",)),
    Rule("worker/training", ("models", "api", "web", "inference"), allowed=("models.spec",)),
    Rule("models", ("fastapi", "starlette", "web", "api", "inference", "worker", *HEAVY)),
    Rule("web", ("api", "inference", *HEAVY)),
]


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def imported_names(path: Path, root: Path) -> set[str]:
    """What a source file imports, as dotted names (`from a import b` gives `a.b`: b may be a module)."""
    package = list(path.relative_to(root).with_suffix("").parts)[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            # A relative import counts from the file's package: `from .. import x` in a/b/c.py is `a.x`.
            parent = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join([*parent, *([node.module] if node.module else [])])
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def violations(rule: Rule, root: Path) -> list[str]:
    return sorted(
        f"{path.relative_to(root)} imports {name}"
        for path in (root / rule.directory).rglob("*.py")
        for name in imported_names(path, root)
        if any(within(name, f) for f in rule.forbidden) and not any(within(name, a) for a in rule.allowed)
    )


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.directory)
def test_no_layer_imports_what_it_must_not(rule: Rule) -> None:
    assert violations(rule, REPO) == []


def test_the_static_check_finds_lazy_from_and_relative_imports(tmp_path: Path) -> None:
    rules = {rule.directory: rule for rule in RULES}
    (tmp_path / "worker" / "training").mkdir(parents=True)
    (tmp_path / "worker" / "training" / "fine.py").write_text(
        "from models.spec import TrainingSpec\nfrom models import spec\n"
    )
    (tmp_path / "worker" / "training" / "bad.py").write_text(
        "import models.jobs\nfrom models import states\ndef later():\n    from api.errors import APIError\n"
    )
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bad.py").write_text("from ..web import errors\nfrom . import spec\n")

    assert violations(rules["worker/training"], tmp_path) == [
        "worker/training/bad.py imports api.errors.APIError",
        "worker/training/bad.py imports models.jobs",
        "worker/training/bad.py imports models.states",
    ]
    assert violations(rules["models"], tmp_path) == ["models/bad.py imports web.errors"]


def loaded_after_import(module: str, candidates: list[str]) -> list[str]:
    code = f"import sys, {module}; print(','.join(m for m in {candidates!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [m for m in out.strip().split(",") if m]


@pytest.mark.parametrize("module", ["api.main", "api.asgi", "cli.main", "worker.tasks", "worker.embedded"])
def test_service_processes_do_not_import_torch(module: str) -> None:
    assert loaded_after_import(module, HEAVY) == []
