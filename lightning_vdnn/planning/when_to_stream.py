"""``strategy="vdnn"`` fits budgets below the model's own training state: its blocks then stream (L2L).

The activation planner (``planning/activation_plan.py``) moves activations only; the weights, gradients and optimizer state stay on
the device, so a budget they fill alone can never be met by it (gpt_1b: 21.6 GB of state under AdamW against a
17 GB budget at 50% of its in-GPU peak). Layer streaming moves them to host memory and ``resident_blocks="auto"``
brings back as many blocks as the budget holds, so with ``layer_streaming`` left unset, ``"auto"`` turns it on
when the state would fill the budget, and keeps planning the activations in what is left.

The choice is made once, before the model moves to the device (moving it first could be the out-of-memory error
this avoids), from what is known then: the parameters and the precision. The optimizer is not built yet, so its
state is taken to be Adam's, two moments the size of each trainable parameter: the common case, and the larger
(with SGD the estimate is high, and a model that would just fit streams anyway; ``layer_streaming=False`` keeps
it on the device).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_vdnn.streaming.host_memory import ADAM_STATES
from lightning_vdnn.layers import LayerPaths, resolve_layers
from lightning_vdnn.units import GiB

#: Stream when the estimated state exceeds this share of the budget: the rest is the least the activations need
#: (the planner's floor on gpt_1b was within 1% of the state at this estimate).
STREAM_ABOVE = 0.95
#: Precisions under which autocast keeps a 2-byte copy of every weight for forward and backward.
_CASTS = frozenset({"bf16-mixed", "16-mixed"})


def training_state_bytes(module: nn.Module, precision: str = "32-true") -> int:
    """Device bytes ``module``'s training state needs all step: every parameter, and for trainable ones a
    gradient and two Adam moments of its size, plus autocast's 2-byte copy under mixed precision."""
    total = 0
    for p in module.parameters():
        size = p.numel() * p.element_size()
        total += size
        if p.requires_grad:
            total += (1 + ADAM_STATES) * size + (2 * p.numel() if precision in _CASTS else 0)
    return total


def stream_reason(module: nn.Module, budget: int, precision: str, layers: LayerPaths,
                  batch_chunks: int = 1) -> Optional[str]:
    """Why ``module`` must stream its blocks to fit ``budget`` bytes (the message ``VDNNStrategy`` logs), or None
    when its state fits.

    Raises:
        ValueError: the state does not fit, and streaming cannot run: no blocks to stream (the detection's
            candidates and how to set ``layers``), or ``batch_chunks`` > 1, which streaming does not combine with.
    """
    need = training_state_bytes(module, precision)
    if need <= STREAM_ABOVE * budget:
        return None
    why = (f"the model's weights, gradients and optimizer state (about {need / GiB:.2f} GiB with Adam's two "
           f"moments) do not fit memory_budget {budget / GiB:.2f} GiB")
    if batch_chunks > 1:
        raise ValueError(
            f"strategy='vdnn': {why}, and batch_chunks={batch_chunks} cannot move them. Drop batch_chunks, so that "
            "the blocks stream to host memory (layer streaming), raise memory_budget, or set layer_streaming=False "
            "to try on the device anyway.")
    try:
        resolve_layers(module, layers)
    except ValueError as err:
        raise ValueError(
            f"strategy='vdnn': {why}, so its blocks would stream to host memory, but: {err} Or raise memory_budget, "
            "or set layer_streaming=False to try on the device anyway.") from None
    return (f"strategy='vdnn': {why}; streaming its blocks from host memory (layer streaming, resident_blocks="
            "'auto': as many stay on the device as fit). Set layer_streaming=False to keep them on the device.")
