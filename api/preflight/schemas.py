"""The pre-flight estimate as the API answers it: the inference server's report on the files and the
memory, with the duration the API measures from earlier jobs (docs/preflight.md)."""

from typing import Literal

from pydantic import BaseModel

from models.preflight import PreflightReport


class Duration(BaseModel):
    estimated_seconds: float | None
    """Training time at the measured throughput (None: no earlier job to measure it on)."""
    tokens_per_second: float | None
    """The measured throughput of earlier jobs, times `devices` and `scaling_efficiency`."""
    based_on_jobs: int
    n_epochs: int
    tokens_to_train: int
    """The training file's tokens times its epochs: what the job's `trained_tokens` will say."""
    range_test_tokens: int = 0
    """The most tokens the learning-rate range test adds before training (its examples at the file's mean
    tokens per row; not counted in `trained_tokens`); `estimated_seconds` includes them."""
    devices: int = 1
    """`compute.devices`: the ranks the job trains on."""
    scaling_efficiency: float = 1.0
    """The share of N times one device's throughput that N devices reach (1.0 on one device)."""


class Preflight(PreflightReport):
    object: Literal["fine_tuning.preflight"] = "fine_tuning.preflight"
    model: str
    duration: Duration
