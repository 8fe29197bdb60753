"""The random-number and autocast state of a forward, taken once and put back for a rerun that must compute
the same thing: a recompute in backward, an out-of-memory retry.

Both are captured and replayed with ``torch.utils.checkpoint``'s own helpers (``get_device_states``,
``set_device_states`` and its autocast capture), so a replay sees what a ``checkpoint`` recompute would.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

from lightning_vdnn.integrations.adapters.torch import autocast_kwargs


class RngState:
    """The CPU generator's state and, on an accelerator (CUDA...), that device's: what dropout draws from.

    Recompute in backward (``microbatches.ChunkState``) replays it inside :meth:`forked`, leaving the outer stream
    where it was; an out-of-memory retry (``oom_retry.StepSnapshot``) :meth:`restore`-s it, rewinding the stream.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        # ``get_device_states`` takes the devices from tensors: an empty one names ``device`` (none for the CPU)
        self.devices, self.states = (([], []) if device.type in ("cpu", "meta") else
                                     get_device_states(torch.empty(0, device=device)))

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.devices:
            set_device_states(self.devices, self.states, device_type=self.device.type)

    @contextlib.contextmanager
    def forked(self) -> Iterator[None]:
        """Draw from this state inside the block; the global generators are untouched afterwards."""
        with torch.random.fork_rng(devices=self.devices, device_type=self.device.type):
            self.restore()
            yield


class AutocastState:
    """The autocast settings of ``device_type`` and of the CPU when taken, entered again by :meth:`replay`."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.device, self.cpu = autocast_kwargs(device_type)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.device is not None:
                stack.enter_context(torch.autocast(self.device_type, **self.device))
            stack.enter_context(torch.autocast("cpu", **self.cpu))
            yield
