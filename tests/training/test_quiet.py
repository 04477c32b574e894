"""Known library noise is hidden by its exact message and source; every other warning still shows."""

import logging
import warnings

import pytest

from worker.training.quiet import hide_known_library_noise

OTHER = "`other_property` is deprecated and will be removed in v6."
GRADIENT_CHECKPOINTING = (
    "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
    "instead."
)
KERNELS = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already ..."


def warn_from(module: str, message: str, category: type[Warning] = FutureWarning) -> None:
    warnings.warn_explicit(message, category, filename=f"{module}.py", lineno=1, module=module)


def test_only_the_known_warning_is_hidden() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hide_known_library_noise()
        warn_from("transformers.modeling_utils", GRADIENT_CHECKPOINTING)
        warn_from("transformers.modeling_utils", OTHER)
        warn_from("peft.peft_model", GRADIENT_CHECKPOINTING)  # the same words from elsewhere are not ours
        warn_from("transformers.modeling_utils", GRADIENT_CHECKPOINTING, UserWarning)

    shown = [(w.filename, str(w.message), w.category) for w in caught]
    assert shown == [
        ("transformers.modeling_utils.py", OTHER, FutureWarning),
        ("peft.peft_model.py", GRADIENT_CHECKPOINTING, FutureWarning),
        ("transformers.modeling_utils.py", GRADIENT_CHECKPOINTING, UserWarning),
    ]


def test_only_the_kernels_notice_of_bitsandbytes_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    hide_known_library_noise()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(KERNELS, "No module named 'kernels'")
        logger.warning("Failed to load the CPU library: %s", "missing symbol")

    assert caplog.messages == ["Failed to load the CPU library: missing symbol"]
