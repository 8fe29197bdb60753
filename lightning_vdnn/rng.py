"""The random-number state of a step, taken once and put back for a rerun that must draw the same numbers."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class RngState:
    """The CPU generator's state and, on a CUDA device, that device's: what dropout draws from.

    Recompute in backward (``microbatch.ChunkState``) replays it inside :meth:`forked`, leaving the outer stream
    where it was; an out-of-memory retry (``retry.StepSnapshot``) :meth:`restore`-s it, rewinding the stream.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    @contextlib.contextmanager
    def forked(self) -> Iterator[None]:
        """Draw from this state inside the block; the global generators are untouched afterwards."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            self.restore()
            yield
