"""The way a streamed block's weight gradients take to host memory.

Backward packs a block's weight gradients into one flat device buffer, copies it to the host on the
device-to-host stream (straight into the block's ``grad_flat`` when it has no gradient yet, else into a staging
buffer a worker adds from; rounded to bf16 on the device first where the host keeps them in bf16,
``streaming/bf16_grads.py``), and, when they are the step's final gradients, queues the block's host update right
behind them. :class:`GradientPath` is mixed into :class:`~lightning_vdnn.streaming.streamer.LayerStreamer`;
``streaming/sharded.py`` overrides :meth:`GradientPath._reduce` and the clipping. A plain loop clips through
:meth:`GradientPath.clip_grad_norm_`, which refuses bf16 host gradients (torch's own would skip them silently).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from lightning_vdnn.streaming.bf16_grads import check_clipping
from lightning_vdnn.streaming.host_optimizer import HostStepper
from lightning_vdnn.streaming.host_state import HostBlock, accumulate_from, adopt_grads
from lightning_vdnn.streaming.slots import Slot


class GradientPath:
    """Weight gradients from the device slots to host ``p.grad`` (mixed into ``LayerStreamer``)."""

    def wait_grads(self) -> None:
        """Block until every streamed gradient has been added into host ``p.grad``."""
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def _finish_backward(self, block: HostBlock, slot: Slot, dev: Optional[Tensor]) -> None:
        """The block's slot free for the next load, its gradients (None: the pass accumulates none) on their way
        to the host."""
        slot.free = self.engine.record()
        self._calls[block.index] -= 1
        if dev is not None:
            self._push_grads(block, dev, final=self._calls[block.index] <= 0)
        if not self._drain_queued:
            self._drain_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._drain)

    def _drain(self) -> None:
        self._drain_queued = False
        self._direct.clear()
        self._calls = [0] * len(self.blocks)
        self.wait_grads()

    def _grad_buffer(self, block: HostBlock) -> Tensor:
        """The device buffer the block's weight grads are packed into, once the previous block's copy has left it
        (its trained parameters' grads: which train is read again here, ``HostBlock.check_layout``)."""
        block.check_layout()
        if self.engine.is_cuda and self._grad_dev_free is not None:
            self.engine.current_stream().wait_event(self._grad_dev_free)
        return self.grad_dev[: block.pack_numel]

    def _push_grads(self, block: HostBlock, dev: Tensor, final: bool) -> None:
        """Copy the block's packed weight grads (``dev``) to the host: straight into ``grad_flat`` when the
        block has no gradient yet, else into a staging buffer a worker adds from. When they are the step's
        final gradients, the block's host update is queued right behind them."""
        if not dev.numel():  # every parameter of the block frozen: no gradient to copy, no update to queue
            return
        eng = self.engine
        dev = self._reduce(block, dev)
        if self.grad_low is not None and block.grad_flat.dtype == self.grad_low.dtype:
            # bf16 host gradients: the fp32 sum rounded to nearest once, here (``streaming/bf16_grads.py``)
            dev = self.grad_low[: dev.numel()].copy_(dev)
        produced = eng.record()
        direct = block.index not in self._direct and block.can_adopt()
        if not direct:
            block.check_accumulation(again=block.index in self._direct)  # raises here, not later on the worker
        if direct:
            self._direct.add(block.index)
            host = block.grad_flat[: dev.numel()]
        else:
            turn = self._grad_turn = 1 - self._grad_turn
            if self._host_busy[turn] is not None:
                self._host_busy[turn].result()  # the worker is done adding from this staging buffer
            if self.grad_host[turn].numel() < dev.numel():  # parameters unfrozen since the buffers were made
                self.grad_host[turn] = self._arena.empty(dev.numel(), self.grad_dtype)
            host = self.grad_host[turn][: dev.numel()]
        with eng.stream(eng.d2h):
            if eng.is_cuda:
                eng.d2h.wait_event(produced)
            host.copy_(dev, non_blocking=True)
            done = self._grad_dev_free = eng.record(eng.d2h, host_waits=True)  # the worker waits for it
        self.d2h_bytes += dev.nbytes
        steppers = [s for s in self.steppers if s.can_update_now()] if final else []
        fut = self._workers.submit(_land_grads, block, host, done, direct, steppers)
        if not direct:
            self._host_busy[turn] = fut
        self._pending.append(fut)

    def clip_grad_norm_(self, parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` for a plain loop, after the blocks' gradients landed; refused (with the
        fix) where they are bf16 host buffers (``host_state_dtype='bf16'``), which torch's would silently skip."""
        parameters = self._clippable(parameters, "clip_grad_norm_")
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite)

    def clip_grad_value_(self, parameters: Iterable[Tensor], clip_value: float) -> None:
        """``torch.nn.utils.clip_grad_value_``, checked as :meth:`clip_grad_norm_`."""
        torch.nn.utils.clip_grad_value_(self._clippable(parameters, "clip_grad_value_"), clip_value)

    def _clippable(self, parameters: Iterable[Tensor], how: str) -> list[Tensor]:
        """``parameters`` as a list (a generator is read twice), refused under bf16 host gradients, once the
        blocks' gradients have landed."""
        parameters = list(parameters)
        check_clipping([self], parameters, how)
        self.wait_grads()
        return parameters

    def _reduce(self, block: HostBlock, dev: Tensor) -> Tensor:
        """Hook (``streaming/sharded.py``): the device gradients this process copies to the host: all of the block's."""
        return dev


def _land_grads(block: HostBlock, host: Tensor, done: Any, direct: bool, steppers: list[HostStepper]) -> None:
    """Worker: make the copied gradients the block's ``p.grad`` (or add them), then queue its host update."""
    if direct:
        adopt_grads(block, done)
    else:
        accumulate_from(block, host, done)
    for stepper in steppers:
        stepper.submit(block.index)
