"""Helpers for tests that run real jobs: training data, and waiting on a job through any client."""

import json
import time
from collections.abc import Callable
from pathlib import Path

import openai
from openai.types.fine_tuning import FineTuningJob

from tests.conftest import SHARED_DATA

TERMINAL = {"succeeded", "failed", "cancelled"}


def chat_lines(n: int, split: str = "train") -> bytes:
    """The first `n` real examples of the shared sentiment chat set."""
    with open(SHARED_DATA / "sentiment_chat" / f"{split}.jsonl", "rb") as source:
        return b"".join(source.readline() for _ in range(n))


def write_chat(path: Path, n: int, split: str = "train") -> Path:
    path.write_bytes(chat_lines(n, split))
    return path


def prompt_completion_lines(n: int) -> bytes:
    return b"".join(
        json.dumps({"prompt": f"{i} plus one is", "completion": f" {i + 1}"}).encode() + b"\n"
        for i in range(n)
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def succeeded(client: openai.OpenAI, job: FineTuningJob, timeout: float = 300) -> FineTuningJob:
    """Poll a job through the openai client until it ends; it must have succeeded."""
    deadline = time.monotonic() + timeout
    while job.status not in TERMINAL:
        assert time.monotonic() < deadline, f"job stuck in {job.status}"
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    return job
