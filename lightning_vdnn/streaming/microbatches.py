"""Layer-major microbatches for L2L layer streaming: a block's input split along dim 0, one chunk at a time.

All k chunks pass through block i, while its weights sit in one device slot, before any reaches block i+1:
the weights cross PCIe as often as unsplit (once per pass), and what shrinks k-fold is the block's internal
activation memory (its forward, and its recompute in backward, hold one chunk's). The split changes the
arithmetic only within rounding if each sample is computed independently inside a block, which holds for
transformer blocks (LayerNorm/RMSNorm, attention within a sequence) and not for BatchNorm, which is refused.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_vdnn.buffers import BufferSnapshot, BufferWatch
from lightning_vdnn.rng import AutocastState, RngState


def check_microbatches(microbatches: int, container: nn.Module, path: str) -> int:
    """Refuse a count that is not a positive int, and blocks whose samples are not independent.

    Raises:
        ValueError: ``microbatches`` < 1 or not an int; BatchNorm inside the blocks with ``microbatches`` > 1.
    """
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches={microbatches!r} must be a positive integer (1 runs the whole batch through "
                         "each block at once).")
    if microbatches > 1:
        for name, module in container.named_modules():
            if isinstance(module, _BatchNorm):
                raise ValueError(
                    f"microbatches={microbatches} splits the batch inside each block at {path!r}, but "
                    f"{path}.{name} is a {type(module).__name__}, whose statistics would then cover a chunk, not "
                    "the batch. Use microbatches=1, or a per-sample norm (LayerNorm, GroupNorm) in the blocks.")
            if getattr(module, "batch_first", True) is False:
                raise ValueError(
                    f"microbatches={microbatches} splits dim 0 of each block's input at {path!r}, but {path}.{name} is "
                    f"a {type(module).__name__} with batch_first=False (sequence first), whose dim 0 is not the batch. "
                    "Build the model with batch_first=True, or use microbatches=1.")
    return microbatches


def refuse_written_buffers(watch: BufferWatch, before: Optional[BufferSnapshot], where: str, chunks: int) -> None:
    """After the first chunk's forward (``before``: the block's buffers before it): a block whose forward writes
    buffers (spectral norm's power iteration, a step counter, running statistics) would write them once per chunk
    instead of once per batch. The first chunk's writes are undone, so the failed step leaves the model as it was.

    Raises:
        ValueError: the forward wrote a buffer; the message names them and what to do.
    """
    watch.learn(before)
    if not watch.written:
        return
    watch.restore(before)
    names = [watch.names[i] for i in sorted(watch.written)]
    listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise ValueError(f"microbatches={chunks} splits the batch inside each block, but {where} writes buffers in its "
                     f"forward ({listed}: a spectral norm's power iteration, a counter, running statistics), which "
                     "would then be written once per chunk instead of once per batch. Use microbatches=1.")


class ChunkState:
    """RNG, autocast and written-buffer state before one chunk's forward, replayed for its recompute (as
    ``torch.utils.checkpoint`` does for a whole segment): dropout draws the same masks again, and BatchNorm reads
    the statistics the forward read without updating them a second time (``buffers.py``)."""

    def __init__(self, device: torch.device, buffers: Optional[BufferWatch] = None) -> None:
        self.device_type = device.type
        self.rng = RngState(device)
        self.autocast = AutocastState(device.type)
        self.watch = buffers
        self.buffers = buffers.snapshot() if buffers is not None else None

    def ran(self) -> None:
        """The chunk's forward has run: learn which buffers it wrote."""
        if self.watch is not None:
            self.watch.learn(self.buffers)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        buffers = self.watch.replayed(self.buffers) if self.watch is not None else contextlib.nullcontext()
        with self.rng.forked(), torch.enable_grad(), self.autocast.replay(), buffers:
            yield
