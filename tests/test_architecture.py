"""Import boundaries: neither the API nor the worker parent (Celery, embedded dispatcher) loads torch.
The other direction, training never loading service code, is tests/training/test_import_hygiene.py."""

import subprocess
import sys

import pytest

HEAVY = ["torch", "transformers", "peft"]


def loaded_after_import(module: str, candidates: list[str]) -> list[str]:
    code = f"import sys, {module}; print(','.join(m for m in {candidates!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [m for m in out.strip().split(",") if m]


@pytest.mark.parametrize("module", ["api.main", "api.asgi", "cli.main", "worker.tasks", "worker.embedded"])
def test_service_processes_do_not_import_torch(module: str) -> None:
    assert loaded_after_import(module, HEAVY) == []
