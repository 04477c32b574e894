"""Known, harmless library messages kept out of what users read; every other warning stays visible.

Called before torch, transformers or peft load: the training child (`python -m worker.training`) and the
inference server, whose output reaches the user's terminal under `ftjobs up` and `make demo`.
"""

import logging
import sys
import warnings

# peft (0.21) reads this deprecated transformers (5.x) property whenever it wraps a model.
_GRADIENT_CHECKPOINTING_ALIAS = r"`is_gradient_checkpointing` is deprecated and will be removed in v6\."
# bitsandbytes (0.50) logs this on import on AVX512-BF16 CPUs without the optional `kernels` package, whose
# faster CPU kernel is a download from the Hugging Face Hub: the built-in kernel serves instead.
_KERNELS_COMMUNITY = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_KERNELS_COMMUNITY))


_DROP_KERNELS_NOTICE = _DropKernelsNotice()  # one instance, so a second call adds no second filter


def hide_known_library_noise() -> None:
    warnings.filterwarnings(
        "ignore",
        message=_GRADIENT_CHECKPOINTING_ALIAS,
        category=FutureWarning,
        module=r"transformers\.modeling_utils$",
    )
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DROP_KERNELS_NOTICE)


def skip_bitsandbytes() -> None:
    """Make `import bitsandbytes` fail, as if it were not installed (a `None` entry in `sys.modules`): peft
    imports it whenever it can, yet only qlora uses it. Must run before peft is imported."""
    sys.modules.setdefault("bitsandbytes", None)
