"""``offload_optimizer=True`` with layer streaming: the modules outside the blocks are stepped on the host too.

Embeddings, final norm and head (and nothing inside the streamed container: resident blocks are stepped on
the device, which is what makes them resident) compute on the device as usual, and their gradients land
there. Their fp32 master weights and their optimizer state live in host memory (pinned on CUDA): inside
``optimizer.step()``, after clipping or unscaling, the gradients are copied to the host, an optimizer of the
user's class updates the masters there (sharing the user's per-parameter state, so ``state_dict()`` and
checkpoints are unchanged), and the masters are copied back into the device parameters, which are compute
copies. The device saves the optimizer state (8 bytes per parameter with Adam); the step waits for the update,
a small share of an L2L model's parameters.

It acts through torch's step hooks (``streaming/step_hooks.py``), nothing of the optimizer replaced; installed
after the blocks' :class:`~lightning_vdnn.streaming.host_optimizer.HostStepper`, its update runs after theirs are
queued, so that the blocks' jobs overlap it.

A device parameter written by anyone else (``load_state_dict``, a resumed checkpoint, your own code) is the
newer value: its master is refreshed from it before the next update.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_vdnn.streaming.host_state import host_empty, state_to_host
from lightning_vdnn.streaming.host_optimizer import _FUSED_ON_CPU, _hyper
from lightning_vdnn.streaming.step_hooks import StepHooks


class OutsideStepper:
    """Steps ``params`` of ``optimizer`` on the host (see the module docstring); hooks ``optimizer.step`` until
    :meth:`close`. Install it after the blocks' :class:`~lightning_vdnn.streaming.host_optimizer.HostStepper`.

    Args:
        optimizer: the user's optimizer.
        params: the parameters to step on the host (those of ``optimizer`` among them).
        pin: page-locked host buffers (CUDA).
        fused: torch's fused CPU kernel where the class has one (rounds like a multi-tensor kernel; off for
            exact comparisons against plain CPU training).
    """

    def __init__(self, optimizer: Optimizer, params: Iterable[nn.Parameter], pin: bool, fused: bool) -> None:
        self.optimizer = optimizer
        wanted = {id(p) for p in params}
        self.params: list[nn.Parameter] = []
        self.masters: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.groups: list[int] = []  # the user's groups with parameters here
        groups = []
        for gi, group in enumerate(optimizer.param_groups):
            mine = [p for p in group["params"] if id(p) in wanted]
            if mine:
                self.groups.append(gi)
                groups.append({**_hyper(group), "params": [self._add(p, pin) for p in mine]})
        extra = {"fused": True} if fused and type(optimizer) in _FUSED_ON_CPU else {}
        self.sub: Optional[Optimizer] = type(optimizer)(groups, **extra) if self.params else None
        self._versions = [p._version for p in self.params]
        self.keep_state_on_host()
        self._stashed: list[tuple[nn.Parameter, Tensor]] = []
        self._hooks = StepHooks(optimizer, self._step_on_host, self._restore_grads)

    def _add(self, p: nn.Parameter, pin: bool) -> Tensor:
        master = host_empty(p.numel(), p.dtype, pin).view(p.shape)
        master.copy_(p.detach())
        self.params.append(p)
        self.masters.append(master)
        self.grads.append(host_empty(p.numel(), p.dtype, pin).view(p.shape))
        return master

    def keep_state_on_host(self) -> None:
        """The optimizer state of the host-stepped parameters back in host memory (Lightning moves all of it)."""
        state_to_host(self.optimizer, self.params)

    def close(self) -> None:
        """Remove the hooks; the device parameters hold the masters' values already."""
        self._hooks.remove()

    def rehook(self) -> None:
        """Hooks again, now after any registered since (a rebuilt streamer's ``HostStepper``)."""
        self._hooks.remove()
        self._hooks = StepHooks(self.optimizer, self._step_on_host, self._restore_grads)

    def _step_on_host(self) -> None:
        """Inside the step, after its backward: the host update, and the gradients hidden from the optimizer's own
        update, which steps what stays on the device."""
        stepping = [k for k, p in enumerate(self.params) if p.grad is not None]
        if stepping:
            self._update(stepping)
        self._stashed = [(p, p.grad) for p in self.params if p.grad is not None]
        for p, _ in self._stashed:
            p.grad = None

    def _restore_grads(self) -> None:
        stashed, self._stashed = self._stashed, []
        for p, g in stashed:
            p.grad = g

    @torch.no_grad()
    def _update(self, stepping: list[int]) -> None:
        """Masters refreshed where the device copy was written since, gradients to the host, the host step,
        and the new masters into the device parameters."""
        for k, p in enumerate(self.params):
            if p._version != self._versions[k]:
                self.masters[k].copy_(p)
                self._versions[k] = p._version
        for k in stepping:
            self.grads[k].copy_(self.params[k].grad)
            self.masters[k].grad = self.grads[k]
        for sub_group, gi in zip(self.sub.param_groups, self.groups):
            sub_group.update(_hyper(self.optimizer.param_groups[gi]))  # the schedule's current learning rate
        for master, p in zip(self.masters, self.params):
            self.sub.state[master] = self.optimizer.state[p]  # the user's dict: init and updates land there
        try:
            self.sub.step()
        finally:
            for master in self.masters:
                master.grad = None
        for k in stepping:
            self.params[k].copy_(self.masters[k])
            self._versions[k] = self.params[k]._version



def outside_params(root: nn.Module, container: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of ``root`` outside ``container`` (the blocks, resident or streamed)."""
    inside = {id(p) for p in container.parameters()}
    return [p for p in root.parameters() if id(p) not in inside and p.requires_grad]
