"""The precisions layer streaming trains with, and the dtype its device slots hold."""

from __future__ import annotations

import torch

_MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
def compute_dtype(precision: str, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the device slots hold: autocast's for mixed precision (so it casts nothing), else the params'."""
    return _MIXED.get(str(precision), param_dtype)


#: Lightning precisions layer streaming trains with: fp32 host master weights with fp32 or autocast compute, or
#: the model's own half-precision weights ("bf16-true", "16-true": the host keeps them as plain training keeps
#: them on the device, and the user's optimizer steps them there).
SUPPORTED_PRECISIONS: tuple[str, ...] = ("32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true")


def check_precision(precision: str) -> None:
    """Refuse, before anything is moved, a precision layer streaming does not train with (fp8, transformer-engine,
    "64-true")."""
    if str(precision) not in SUPPORTED_PRECISIONS:
        raise ValueError(f"layer streaming does not support precision={precision!r}; it supports "
                         f"{list(SUPPORTED_PRECISIONS)}. Set Trainer(precision=...) to one of them, or drop "
                         "layer_streaming.")
