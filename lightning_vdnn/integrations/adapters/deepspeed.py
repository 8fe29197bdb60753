"""What ``lightning_vdnn`` changes inside DeepSpeed where DeepSpeed has no public setting for it.

Written against deepspeed 0.19.8 (with lightning 2.6.6, whose ``DeepSpeedStrategy`` makes the call patched
here); ``tests/test_adapters.py`` checks both sides and fails naming what changed.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, Iterator

#: The DeepSpeed release this module was written (and tested) against.
WRITTEN_AGAINST = "0.19.8"


@contextlib.contextmanager
def device_rank(rank: int) -> Iterator[None]:
    """Calls to ``deepspeed.initialize`` inside the block build their engine for device ``rank``.

    Lightning's ``DeepSpeedStrategy`` passes ``args=argparse.Namespace(device_rank=root_device.index)``: None
    for a CPU device, which the engine (``DeepSpeedEngine._set_distributed_vars``) compares with 0, and below 0
    it would train as world size 1. DeepSpeed's config has no key for it and Lightning builds the call itself,
    so the call is redirected, for the block's duration only, with a CPU rank's device index: its local rank.
    """
    import deepspeed

    initialize = deepspeed.initialize

    def with_rank(*args: Any, **kwargs: Any) -> Any:
        kwargs["args"] = argparse.Namespace(device_rank=rank)
        return initialize(*args, **kwargs)

    deepspeed.initialize = with_rank
    try:
        yield
    finally:
        deepspeed.initialize = initialize
