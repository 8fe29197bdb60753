"""``batch_chunks``: one module (a CNN's convolutional trunk, say) runs its batch in dim-0 chunks, one after another.

Why: with every activation offloaded, a step's device peak is the working set of its largest layer, not the
activations it saves: VGG-16 at batch 256 holds a 1.6 GB input, output and their gradients at once in its first
convolutions (7.75 GiB floor against 12.1 GiB in-GPU). Chunks of the batch shrink that working set k-fold;
what is saved for backward is the same bytes, offloaded as before.

How: the module's ``forward`` is replaced on the instance by one that runs the module's own forward on each
chunk and concatenates the outputs. Autograd then holds k independent graphs below the concatenation, and its
engine runs the one created last to the end before it starts the next (it orders ready work by creation), so
backward, too, holds one chunk's gradients at a time. The offloader sees each chunk's layer calls as layers of
their own, in forward order, and prefetches them in the order backward takes them.

Exact up to rounding where the module computes each sample on its own: convolutions, pooling, activations,
dropout (other draws, the same distribution). BatchNorm is refused: its statistics would cover a chunk.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_vdnn.layers import resolve_module, wrap_forward


def batchnorm_inside(module: nn.Module, path: str) -> Optional[str]:
    """What refuses chunking ``module`` (at ``path``): ``"<its path> is a BatchNorm2d"``, or None."""
    for name, sub in module.named_modules():
        if isinstance(sub, _BatchNorm):
            return f"{'.'.join(filter(None, (path, name)))} is a {type(sub).__name__}"
    return None


class BatchChunks:
    """Run the module at ``path`` under ``root`` in ``chunks`` dim-0 chunks until :meth:`close`.

    Raises:
        ValueError: no module at ``path``, or a BatchNorm inside it.
    """

    def __init__(self, root: nn.Module, path: str, chunks: int) -> None:
        self.module = resolve_module(root, path, "chunk_layers")
        refused = batchnorm_inside(self.module, path)
        if refused is not None:
            raise ValueError(
                f"batch_chunks={chunks} runs {path!r} one chunk of the batch at a time, but {refused}, whose "
                "statistics would then cover a chunk, not the batch. Use batch_chunks=1, or chunk a module without "
                "BatchNorm (or one with per-sample norms: LayerNorm, GroupNorm).")
        self.path, self.chunks = path, chunks

        def forward(own: Callable[..., Any], x: Any, *args: Any, **kwargs: Any) -> Tensor:
            if not isinstance(x, Tensor) or x.dim() == 0:
                raise TypeError(f"batch_chunks splits dim 0 of the first argument of {path!r}, which got "
                                f"{type(x).__name__ if not isinstance(x, Tensor) else 'a 0-d tensor'}.")
            pieces = x.tensor_split(min(chunks, len(x)))
            outs = [own(piece, *args, **kwargs) for piece in pieces]
            for piece, out in zip(pieces, outs):
                if not isinstance(out, Tensor) or out.dim() == 0 or len(out) != len(piece):
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(
                        f"batch_chunks splits dim 0 of {path!r}'s input, but it returned {shape} for a chunk of "
                        f"shape {tuple(piece.shape)}: the module must return one batch-first tensor.")
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        self._restore = wrap_forward(self.module, forward)

    def report_fields(self) -> dict:
        """The chunks, for a ``MemoryReport``."""
        return dict(batch_chunks=self.chunks, chunk_layers=self.path)

    def close(self) -> None:
        """The module's own ``forward`` back."""
        self._restore()
