"""A streamed block whose gradients live in host memory in bf16: the lean host state (``host_state_dtype="bf16"``).

With bf16 Adam moments (``streaming/host_update.py``) the fp32 gradient buffer is the largest host state after the
master weights: 4 of 12 bytes per parameter. Here it is bf16, 2 bytes, and half the bytes cross PCIe:

* **where the sum is fp32**: backward packs a block's weight gradients into the fp32 device buffer and adds the
  ``microbatches`` chunks there (``HostBlock.pack_grads``), so the gradient of the step is summed in fp32 and
  rounded to nearest bf16 once, on the device, just before it is copied to the host (``streaming/gradient_path.py``);
* **the update** widens each piece to fp32 inside its one pass (``AdamPass._piece``) and computes in fp32;
* **numerics**: each gradient element carries bf16's relative rounding error (at most 2^-9) into one step's
  update; Adam's moments average it over steps, and the fp32 master weights never round it in. In the tests,
  12 AdamW steps of ``gpt_tiny`` stay within 0.1% of fp32 states' losses.

A bf16 tensor cannot be an fp32 parameter's ``p.grad`` (torch checks the dtype), so, as with
``streaming/sharded.py``, a block parameter's ``p.grad`` stays None during training: the host update reads the
buffer (:meth:`Bf16GradBlock.grad_of`), and the gradients go with the host buffers when streaming ends
(:meth:`Bf16GradBlock._release_grads`). Summing a second backward's gradients into the buffer before the step (Lightning's
``accumulate_grad_batches``, or two ``backward()`` calls) would round the running sum to bf16 at every addition,
which is not the fp32 accumulation of plain training; that is refused, pointing at ``microbatches``, which sums
in fp32 on the device instead.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from lightning_vdnn.streaming.host_state import HostBlock

#: The dtype of the host gradients in the lean host state.
GRAD_DTYPE = torch.bfloat16


def host_grad_dtype(state_dtype: torch.dtype, weights: torch.dtype, precision: str) -> torch.dtype:
    """The dtype of the blocks' host gradients: bf16 in the lean host state (bf16 moments) over fp32 weights,
    else the weights'.

    Raises:
        ValueError: bf16 gradients with ``precision="16-mixed"``, whose loss scaler needs them in ``p.grad``.
    """
    if state_dtype != GRAD_DTYPE or weights != torch.float32:
        return weights
    if str(precision) == "16-mixed":
        raise ValueError(
            "host_state_dtype='bf16' keeps the blocks' gradients in bf16 host buffers, not in p.grad, and "
            "precision='16-mixed' has a loss scaler that unscales and checks p.grad. Use precision='bf16-mixed' "
            "(no loss scaler) or '32-true', or host_state_dtype='fp32'.")
    return GRAD_DTYPE


def clipping_refused(how: str, drop: str = "the clipping") -> ValueError:
    """The error for ``how`` (a clipping call) with bf16 host gradients: what is wrong, and the two ways out."""
    return ValueError(
        f"{how} with host_state_dtype='bf16': the streamed blocks' gradients live in bf16 host buffers, not in p.grad, "
        f"so clipping would silently leave them out of the norm. Use host_state_dtype='fp32' to clip, or drop {drop}.")


def check_clipping(streamers: Iterable[Any], params: Iterable[Tensor], how: str) -> None:
    """Raise :func:`clipping_refused` if any of ``params`` is a block parameter of one of ``streamers``
    (:class:`~lightning_vdnn.streaming.streamer.LayerStreamer`) whose gradients are bf16 host buffers: every entry
    point's clipping calls this before torch's ``clip_grad_norm_``/``clip_grad_value_``, which read ``p.grad``."""
    ids = {id(p) for p in params}
    for streamer in streamers:
        if streamer.lean_grads and any(id(p) in ids for b in streamer.blocks for p in b.params):
            raise clipping_refused(how)


class GradientAccumulationError(RuntimeError):
    """A second backward's gradients arrived for a block before the optimizer step, with bf16 host gradients."""


class Bf16GradBlock(HostBlock):
    """A :class:`HostBlock` whose gradients are one flat bf16 host buffer, not fp32 ``p.grad`` (module docstring)."""

    def _init_grads(self, pin: bool) -> None:
        self._layout_grads()
        self.grad_flat = self._grad_buffer(GRAD_DTYPE)
        self.grad_views = self.grad_split(self.grad_flat)
        self.has_grad = [False] * len(self.params)
        self.zeroed = [False] * len(self.params)  # zero_grad(set_to_none=False): zeros the next gradient replaces
        with torch.no_grad():
            for k, p in enumerate(self.params):
                if p.grad is not None and self.grad_views[k] is not None:  # from before streaming: kept, in bf16
                    self.grad_views[k].copy_(p.grad)
                    self.has_grad[k] = True
                p.grad = None

    def _relayout(self) -> None:
        """As :meth:`HostBlock._relayout`, but the bf16 gradients held move into the new buffer."""
        held = [(k, self.grad_views[k]) for k in range(len(self.params)) if self.has_grad[k]]
        self._layout_grads()
        self.grad_flat = self._grad_buffer(GRAD_DTYPE)
        self.grad_views = self.grad_split(self.grad_flat)
        with torch.no_grad():
            for k, old in held:
                if self.grad_views[k] is None:  # frozen now: its gradient is dropped, as for a frozen parameter
                    self.has_grad[k] = self.zeroed[k] = False
                else:
                    self.grad_views[k].copy_(old)

    def grad_of(self, k: int) -> Optional[Tensor]:
        return self.grad_views[k] if self.has_grad[k] else None

    def clear_grads(self, keys: list[int], set_to_none: bool) -> None:
        for k in keys:
            if set_to_none:
                self.has_grad[k] = self.zeroed[k] = False
            elif self.has_grad[k]:
                self.grad_views[k].zero_()
                self.zeroed[k] = True

    def _empty(self, k: int) -> bool:
        return not self.has_grad[k] or self.zeroed[k]

    def can_adopt(self) -> bool:
        return all(self._empty(k) for k, trained in enumerate(self.trained) if trained)

    def adopt(self) -> None:
        self.has_grad = [v is not None for v in self.grad_views]
        self.zeroed = [False] * len(self.params)

    def check_accumulation(self, again: bool) -> None:
        trained = [k for k, p in enumerate(self.params) if p.requires_grad]
        if again or not all(self._empty(k) for k in trained):
            raise GradientAccumulationError(
                f"block {self.index} received a second backward's gradients before the optimizer step (or ran twice in "
                "one forward), and its host "
                "gradients are bf16 (host_state_dtype='bf16'): adding them there would round the sum to bf16 at "
                "every step of the accumulation. Use microbatches=k instead of accumulate_grad_batches (the k "
                "chunks are summed in fp32 on the device), or host_state_dtype='fp32'.")

    def accumulate(self, grads: Tensor) -> None:
        """Set each trained parameter's gradient from the flat bf16 ``grads`` (:meth:`check_accumulation` refused
        adding to one already there)."""
        for k, new in enumerate(self.grad_split(grads)):
            if new is not None:
                self.grad_views[k].copy_(new)
                self.has_grad[k], self.zeroed[k] = True, False

    def _release_grads(self) -> None:
        """The bf16 gradients go with the host buffers and ``p.grad`` stays None, as during training: widening them
        to fp32 would take 4 more bytes a parameter just when the host is fullest."""
        self.has_grad = [False] * len(self.params)

    def grads(self, ids: set[int]) -> list[Tensor]:
        """The bf16 gradients of the parameters whose ``id`` is in ``ids`` (clipping, ``streaming/sharded.py``'s
        signature)."""
        return [v for p, v, has in zip(self.params, self.grad_views, self.has_grad) if has and id(p) in ids]
