"""The pre-flight estimate as the API answers it: the inference server's report on the files and the
memory, with the duration the API measures from earlier jobs (docs/preflight.md)."""

from typing import Literal

from pydantic import BaseModel

from models.preflight import PreflightReport


class Duration(BaseModel):
    estimated_seconds: float | None
    """Training time at the measured throughput (None: no earlier job to measure it on)."""
    tokens_per_second: float | None
    based_on_jobs: int
    n_epochs: int
    tokens_to_train: int
    """The training file's tokens times its epochs: what the job's `trained_tokens` will say."""


class Preflight(PreflightReport):
    object: Literal["fine_tuning.preflight"] = "fine_tuning.preflight"
    model: str
    duration: Duration
