"""The precisions layer streaming trains with, and the dtype its device slots hold."""

from __future__ import annotations

import torch

_MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
def compute_dtype(precision: str, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the device slots hold: autocast's for mixed precision (so it casts nothing), else the params'."""
    return _MIXED.get(str(precision), param_dtype)


#: Lightning precisions layer streaming trains with: fp32 host master weights, fp32 or autocast compute.
SUPPORTED_PRECISIONS: tuple[str, ...] = ("32-true", "16-mixed", "bf16-mixed")


def check_precision(precision: str) -> None:
    """Refuse, before anything is moved, a precision whose host weights would not be fp32 masters."""
    if str(precision) not in SUPPORTED_PRECISIONS:
        raise ValueError(f"layer streaming does not support precision={precision!r}; it keeps fp32 master weights in "
                         f"host memory and supports {list(SUPPORTED_PRECISIONS)}. Set Trainer(precision=...) to one "
                         "of them, or drop layer_streaming.")
