"""Where training runs and in which dtype: the one place that looks at the hardware."""

from dataclasses import dataclass

import torch
from transformers import BitsAndBytesConfig


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device
    dtype: torch.dtype

    @property
    def needs_grad_scaling(self) -> bool:
        # fp16 gradients underflow without loss scaling; bf16 and fp32 have the range to go without.
        return self.dtype == torch.float16


def select_device() -> DeviceConfig:
    """CUDA in bf16 where the GPU does it natively (fp16 on older GPUs), else CPU in float32."""
    if torch.cuda.is_available():
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return DeviceConfig(torch.device("cuda"), torch.bfloat16 if native_bf16 else torch.float16)
    return DeviceConfig(torch.device("cpu"), torch.float32)


def bnb_4bit_config(device: DeviceConfig) -> BitsAndBytesConfig:
    """QLoRA-style 4-bit loading: NF4 weights, double-quantised constants, compute in the device dtype."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=device.dtype,
    )
