"""Where training runs and in which dtype: the one place that looks at the hardware."""

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import BitsAndBytesConfig

from models.spec import DeviceInfo


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device
    dtype: torch.dtype
    """What the base weights load in."""
    compute_dtype: torch.dtype | None = None
    """Mixed precision: the dtype matmuls run in under autocast (None: the weights' own)."""

    @property
    def needs_grad_scaling(self) -> bool:
        # fp16 gradients underflow without loss scaling; bf16 and fp32 have the range to go without.
        return torch.float16 in (self.dtype, self.compute_dtype)

    def autocast(self) -> AbstractContextManager[object]:
        if self.compute_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)


def select_device(trains_base_weights: bool = False) -> DeviceConfig:
    """CUDA in bf16 where the GPU does it natively (fp16 on older GPUs), else CPU in float32.

    On CUDA a frozen base loads in the half dtype (adapters train in float32 beside it, as PEFT keeps
    them); a base whose own weights train (`trains_base_weights`) keeps float32 master weights and runs
    under autocast, since AdamW updates are lost in bf16 weights."""
    if torch.cuda.is_available():
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return device_config("cuda", trains_base_weights, native_bf16)
    return device_config("cpu", trains_base_weights)


def device_config(
    device_type: Literal["cpu", "cuda"], trains_base_weights: bool = False, native_bf16: bool = True
) -> DeviceConfig:
    """`select_device`'s rule for a given kind of device, also for one this process does not have (the
    pre-flight estimate sizes a job for the workers' device)."""
    if device_type == "cuda":
        half = torch.bfloat16 if native_bf16 else torch.float16
        cuda = torch.device("cuda")
        return DeviceConfig(cuda, torch.float32, half) if trains_base_weights else DeviceConfig(cuda, half)
    return DeviceConfig(torch.device("cpu"), torch.float32)


def describe(config: DeviceConfig) -> DeviceInfo:
    """The device's kind, name and memory, as a job reports it when it starts (the pre-flight estimate
    compares memory against the latest one)."""
    if config.device.type == "cuda":
        properties = torch.cuda.get_device_properties(config.device)
        return DeviceInfo(type="cuda", name=properties.name, total_bytes=properties.total_memory)
    return DeviceInfo(type="cpu", name=f"CPU ({os.cpu_count()} cores)", total_bytes=usable_memory())


def usable_memory() -> int | None:
    """Physical memory, or the cgroup's limit (a container's) when lower; None where unknown."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="utf-8").strip()
    except OSError:
        return physical
    return min(physical, int(limit)) if limit.isdigit() else physical


def bnb_4bit_config(device: DeviceConfig) -> BitsAndBytesConfig:
    """QLoRA-style 4-bit loading: NF4 weights, double-quantised constants, compute in the device dtype."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=device.compute_dtype or device.dtype,
    )
