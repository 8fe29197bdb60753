"""Cross-entropy over a large vocabulary with the head's logits made one chunk of tokens at a time.

A language model's logits outweigh a streamed block: at 8 x 1024 tokens and 32000 words they are 0.5 GB in bf16,
1 GB again as the fp32 the loss reads, and 1 GB for their gradient, where L2L keeps one 1.35B-GPT block in 0.2 GB.
Each chunk's head and loss run under activation checkpointing, so forward keeps only a scalar per chunk and
backward rebuilds one chunk's logits at a time: the peak is one chunk's logits, for one more head matmul
(what torchtune's chunked loss and Liger's fused linear cross-entropy also trade).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def chunked_cross_entropy(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, chunks: int = 8, *,
                          ignore_index: int = -100) -> Tensor:
    """``F.cross_entropy(head(hidden).float(), targets)`` over all tokens (the mean over targets not
    ``ignore_index``), computing the logits of ``1/chunks`` of the tokens at a time in forward and backward.

    Args:
        hidden: ``[..., d]`` the final hidden states (after the last norm).
        head: the module (or function) that maps ``[n, d]`` hidden states to ``[n, vocab]`` logits, such as the
            model's ``lm_head``; as a module its hooks and wrappers see each chunk.
        targets: ``[...]`` token ids, the shape of ``hidden`` without its last dimension.
        chunks: how many pieces the tokens are split into; 1 is the plain loss (``head`` sees ``hidden`` whole,
            and the logits are kept for backward).
        ignore_index: targets left out of the loss and of the mean, as in ``F.cross_entropy``.

    Raises:
        ValueError: ``chunks`` is not a positive integer, or ``targets`` does not match ``hidden``.
    """
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks={chunks!r} must be a positive integer (1 keeps the logits, as the plain loss does).")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match: hidden is "
                         "[..., d] and targets [...], one token id per hidden state.")
    t = targets.reshape(-1)
    if chunks == 1:
        logits = head(hidden)
        return F.cross_entropy(logits.float().reshape(t.numel(), -1), t, ignore_index=ignore_index)
    h = hidden.reshape(t.numel(), hidden.shape[-1])
    total = h.new_zeros((), dtype=torch.float32)
    for hc, tc in zip(h.chunk(chunks), t.chunk(chunks)):
        total = total + checkpoint(_summed_loss, hc, head, tc, ignore_index, use_reentrant=False,
                                   preserve_rng_state=False)
    return total / (t != ignore_index).sum()


def _summed_loss(h: Tensor, head: Callable[[Tensor], Tensor], t: Tensor, ignore_index: int) -> Tensor:
    return F.cross_entropy(head(h).float(), t, ignore_index=ignore_index, reduction="sum")
