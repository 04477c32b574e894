"""The child's failure path: one error event on the pipe, traceback on stderr, exit code 1."""

import os
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from models.spec import ChildMessage, LogMessage
from worker.training.__main__ import main


def test_an_exception_becomes_one_error_event_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text('{"job_id": "ftjob-1"}')  # many required fields missing: a multi-line pydantic error
    read_fd, write_fd = os.pipe()

    assert main(["--spec", str(spec), "--events-fd", str(write_fd)]) == 1

    with os.fdopen(read_fd, encoding="utf-8") as events:
        lines = events.read().splitlines()
    assert len(lines) == 1
    message = TypeAdapter(ChildMessage).validate_json(lines[0])
    assert isinstance(message, LogMessage) and message.level == "error"
    assert message.message.startswith("ValidationError: ") and "base_model_path" in message.message
    assert "\n" not in message.message
    assert "Traceback" in capsys.readouterr().err
