"""Layer-major microbatches for L2L layer streaming: a block's input split along dim 0, one chunk at a time.

All k chunks pass through block i, while its weights sit in one device slot, before any reaches block i+1:
the weights cross PCIe as often as unsplit (once per pass), and what shrinks k-fold is the block's internal
activation memory (its forward, and its recompute in backward, hold one chunk's). The split changes the
arithmetic only within rounding if each sample is computed independently inside a block, which holds for
transformer blocks (LayerNorm/RMSNorm, attention within a sequence) and not for BatchNorm, which is refused.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_vdnn.rng import RngState


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
    return microbatches


def split_rows(x: Tensor, microbatches: int) -> tuple[Tensor, ...]:
    """``x`` in ``min(microbatches, len(x))`` chunks along dim 0, sizes differing by at most one row.

    A batch smaller than ``microbatches`` (an epoch's last, say) runs in one-row chunks rather than failing;
    an empty batch is one empty chunk. Forward and backward call this with the same sizes, so they agree.
    """
    return x.tensor_split(max(1, min(microbatches, x.shape[0]))) if x.dim() else (x,)


class ChunkState:
    """RNG and autocast state before one chunk's forward, replayed for its recompute (as
    ``torch.utils.checkpoint`` does for a whole segment): dropout draws the same masks again."""

    def __init__(self, device: torch.device) -> None:
        self.device_type = device.type
        self.rng = RngState(device)
        self.autocast = torch.is_autocast_enabled(device.type)
        self.dtype = torch.get_autocast_dtype(device.type)
        self.cache = torch.is_autocast_cache_enabled()

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with self.rng.forked(), torch.enable_grad(), torch.autocast(
                self.device_type, dtype=self.dtype, enabled=self.autocast, cache_enabled=self.cache):
            yield


class Rows:
    """Chunk results written into one tensor as they arrive, in any order: keeping the k pieces for
    ``torch.cat`` would hold the block's output twice. A single chunk is used as it is."""

    def __init__(self, pieces: tuple[Tensor, ...]) -> None:
        self.starts = list(itertools.accumulate((p.shape[0] if p.dim() else 0 for p in pieces), initial=0))
        self.out: Optional[Tensor] = None

    def put(self, k: int, piece: Tensor) -> None:
        """``piece`` is chunk ``k`` of the result (the same rows as chunk ``k`` of the input)."""
        if len(self.starts) == 2:
            self.out = piece
            return
        if self.out is None:
            self.out = piece.new_empty((self.starts[-1], *piece.shape[1:]))
        self.out[self.starts[k]: self.starts[k + 1]].copy_(piece)
