"""The host side of L2L's optimizer: each streamed block is updated on a worker thread, off the step's path.

The user's optimizer keeps its class, hyper-parameters, param groups, state and schedule; what changes is
*when* the blocks' share of ``optimizer.step()`` runs. Through torch's step hooks (``streaming/step_hooks.py``;
nothing of the optimizer is replaced but ``zero_grad``, which has no hook: ``integrations/adapters/torch.py``),
a :class:`HostStepper` lets the optimizer's own update step only the modules that live on the device, while
every block gets its own update job on a worker thread, run by a small optimizer of the same class over
aliases of the block's host weights, sharing the user's per-parameter state dictionaries (so
``optimizer.state_dict()`` and checkpoints are unchanged).

Two moments to start a block's update, both exactly what the plain optimizer would compute:

* **eager**, during backward: when nothing may still change the gradients between backward and the step
  (no gradient clipping, no loss scaler, the last micro-batch of an accumulation), a block is updated as soon
  as its gradients have landed in host memory, while the device runs backward through the blocks before it.
* **pipelined**, at the step: otherwise (clipping needs the global norm) every block is queued at
  ``optimizer.step()``, first block first, and the next forward waits for each block only when it loads it.

Anyone about to read a block's host weights calls :meth:`wait` (the streamer does before each copy to the
device, and before a block's ``state_dict()`` or ``load_state_dict()``) or :meth:`wait_all` (checkpoints,
teardown). A parameter read directly (``p.clone()``) between the step and the next forward may be stale.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_vdnn.integrations.adapters.torch import around_zero_grad
from lightning_vdnn.offload.host_pool import wait_for
from lightning_vdnn.units import host_clock
from lightning_vdnn.streaming.host_state import HostBlock
from lightning_vdnn.streaming import native_adam
from lightning_vdnn.streaming.host_update import AdamPass, choose_backend, fits
from lightning_vdnn.streaming.tally import Tally
from lightning_vdnn.streaming.step_hooks import StepHooks

#: Optimizer classes with a fused CPU kernel (one multi-threaded pass over a block, no per-tensor loop).
_FUSED_ON_CPU: tuple[type, ...] = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
#: Group keys that choose an implementation for the user's device, not a hyper-parameter.
_IMPLEMENTATION_KEYS = frozenset({"params", "fused", "foreach", "capturable", "differentiable"})


class _BlockOptimizer:
    """A same-class optimizer over aliases of one block's host weights, one group per user group.

    An alias is what :meth:`HostBlock.master_view` gives: the parameter's host weights (same storage, so the
    update writes the master weights), or, with the block partitioned across ranks, this rank's 1-D range of
    them (``streaming/sharded.py``); parameters with no range on this rank are not stepped here."""

    def __init__(self, optimizer: Optimizer, block: HostBlock, owned: set[int], fused: bool,
                 one_pass: bool = False) -> None:  # one_pass: the stepper's AdamPass updates it, no optimizer here
        self.block = block
        self.groups: list[int] = []
        self.group_of: list[int] = []  # each param's position in ``groups``
        self.params: list[Tensor] = []
        self.keys: list[int] = []  # each param's index in the block
        self.aliases: list[Tensor] = []
        index = {id(p): k for k, p in enumerate(block.params)}
        groups = []
        for gi, group in enumerate(optimizer.param_groups):
            mine = [(p, index[id(p)]) for p in group["params"] if id(p) in owned and id(p) in index]
            mine = [(p, k, block.master_view(k)) for p, k in mine]
            mine = [m for m in mine if m[2] is not None]
            if not mine:
                continue
            self.group_of += [len(self.groups)] * len(mine)
            self.groups.append(gi)
            self.params += [p for p, _, _ in mine]
            self.keys += [k for _, k, _ in mine]
            self.aliases += [a for _, _, a in mine]
            groups.append({**_hyper(group), "params": [a for _, _, a in mine]})
        cls = type(optimizer)
        self.optimizer: Optional[Optimizer] = None
        self.active = bool(groups)
        if groups and not one_pass:
            extra = {"fused": True} if fused and cls in _FUSED_ON_CPU else {}
            self.optimizer = cls(groups, **extra)


def _update_pass(optimizer: Optimizer, fused: bool, backend: str, state_dtype: torch.dtype,
                 weights: torch.dtype = torch.float32) -> Optional[AdamPass]:
    """The one-pass update for the blocks' share of ``optimizer``, or None for a same-class optimizer: the one
    pass where a backend or bf16 moments are asked for. ``"auto"`` with fp32 moments on a GPU run (``fused``)
    takes the native pass where it builds: bit for bit torch's fused kernel, and faster in the step, as it writes
    the bf16 copy in the same pass (``benchmarks/README.md``); on a CPU device, the same-class optimizer (the
    per-tensor loop of plain training, and no compiler run on a machine without a GPU)."""
    wants = backend != "auto" or state_dtype != torch.float32
    if weights != torch.float32:  # bf16-true, 16-true: the user's optimizer steps the half weights, as plain does
        if wants:
            raise ValueError(
                f"host_optimizer={backend!r} with host_state_dtype={_name(state_dtype)!r} updates fp32 master weights, "
                f"and the blocks' weights are {_name(weights)} (precision 'bf16-true' or '16-true'): your optimizer "
                "steps them as it does without streaming, its state in their dtype. Use host_optimizer='auto' and "
                "host_state_dtype='fp32' (the defaults), or a mixed precision ('bf16-mixed') for fp32 masters.")
        return None
    if not fits(optimizer):
        if wants:
            raise ValueError(
                f"host_optimizer={backend!r} with host_state_dtype={_name(state_dtype)!r} runs Adam/AdamW only, and the "
                f"optimizer is {type(optimizer).__name__}"
                f"{' with amsgrad or maximize' if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) else ''}. "
                "Use host_optimizer='auto' and host_state_dtype='fp32' with it, or torch.optim.AdamW.")
        return None
    if backend == "auto":
        if not wants:
            return AdamPass("native", state_dtype) if fused and native_adam.load() is not None else None
        if not fused:
            return AdamPass("torch", state_dtype)
        backend = choose_backend(state_dtype)
    return AdamPass(backend, state_dtype)


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in _IMPLEMENTATION_KEYS}


class _LowestFirst:
    """One worker thread that always runs the queued job with the lowest block index next.

    During backward, gradients land last block first, so this runs the newest; once backward is over it runs
    the rest first block first, the order in which the next forward reads them, so that forward starts as soon
    as block 0 is updated instead of after every block is.
    """

    def __init__(self, name: str) -> None:
        self._jobs: list[tuple[int, int, Future, Callable[..., None], tuple]] = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        # not a daemon: at interpreter exit a daemon killed inside an update's kernel aborts the process;
        # this one sees the main thread end, drains the queue and returns (a script may end right after step)
        self._thread = threading.Thread(target=self._run, name=name)
        self._thread.start()

    def submit(self, priority: int, fn: Callable[..., None], *args: Any) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the host optimizer worker is shut down")
            heapq.heappush(self._jobs, (priority, next(self._order), fut, fn, args))
            self._cv.notify()
        return fut

    def shutdown(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._closed:
                    self._cv.wait(timeout=0.25)
                    self._closed |= not threading.main_thread().is_alive()
                if not self._jobs:
                    return
                _, _, fut, fn, args = heapq.heappop(self._jobs)
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as err:  # handed to whoever waits for this block
                    fut.set_exception(err)


class HostStepper:
    """Runs the streamed blocks' share of ``optimizer.step()`` on a worker thread (see the module docstring).

    Args:
        optimizer: the user's optimizer; hooked (``step``, ``zero_grad``) until :meth:`close`.
        blocks: the streamed blocks; their parameters in ``optimizer`` are stepped here.
        eager: allow updates during backward (the strategy turns it off when clipping or a loss scaler could
            still change the gradients after backward).
        fused: update with torch's fused CPU kernel where the class has one (Adam, AdamW, SGD, Adagrad): one
            multi-threaded pass per block, several times faster than the per-tensor loop torch picks for CPU
            tensors. It rounds differently from that loop (as the device's foreach kernel does), so exact
            comparisons against a plain CPU run turn it off.
        backend: ``"auto"``: with ``fused`` and fp32 moments, ``"native"`` (the same bits as the fused
            optimizer) where it builds, else the same-class optimizer;
            ``"torch"``, ``"deepspeed"`` or ``"native"``: the one pass of ``streaming/host_update.py`` with that
            kernel (it writes the blocks' compute-dtype copies as it goes).
        state_dtype: the precision of Adam's moments in host memory (bf16: the one pass, even on a CPU device).

    Raises:
        ValueError: a backend or bf16 moments asked for an optimizer other than Adam/AdamW (or with AMSGrad).
    """

    def __init__(self, optimizer: Optimizer, blocks: list[HostBlock], eager: bool = True,
                 fused: bool = True, backend: str = "auto", state_dtype: torch.dtype = torch.float32) -> None:
        self.optimizer, self.blocks, self.eager = optimizer, blocks, eager
        weights = blocks[0].dtype if blocks else torch.float32
        self.update_pass = _update_pass(optimizer, fused, backend, state_dtype, weights)
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        one_pass = self.update_pass is not None
        self._subs = [_BlockOptimizer(optimizer, b, owned, fused, one_pass) for b in blocks]
        self._block_params = [p for s in self._subs for p in s.params]
        self._worker = _LowestFirst("l2l-step")
        self._futures: dict[int, Future] = {}
        self._updated: set[int] = set()  # blocks whose update for the coming step is already queued
        self._in_step = False
        self.update_ms = Tally()  # worker time of block updates not yet reported
        self.wait_ms = Tally()    # time the training thread waited for them, not yet reported
        self.eager_updates = 0  # block updates queued during backward so far
        self._stashed: list[tuple[Tensor, Tensor]] = []
        # torch's public step hooks: block jobs queued (and their gradients hidden from the body, which then
        # steps the device modules only) after the step's backward, gradients back after the step
        # (``streaming/step_hooks.py``). ``zero_grad`` has none: the torch adapter wraps it (see ``_before_zero``).
        self._hooks = StepHooks(optimizer, self._submit_all, self._restore_grads, self._stepping_backward)
        self._unwrap_zero_grad = around_zero_grad(optimizer, self._before_zero, self._after_zero)
        # the optimizer's state is the blocks' moments, which queued updates write after ``step()`` returns
        self._state_hooks = [optimizer.register_state_dict_pre_hook(lambda _: self.wait_all()),
                             optimizer.register_load_state_dict_pre_hook(lambda *_: self.wait_all())]

    # -- scheduling ----------------------------------------------------------------------------------------
    def can_update_now(self) -> bool:
        """True inside ``optimizer.step(closure)``'s closure in eager mode: this backward's gradients are the
        step's (whoever calls the step: Lightning, Fabric, a plain loop)."""
        return self.eager and self._in_step

    def submit(self, index: int) -> None:
        """Queue block ``index``'s update with its current host gradients (once per step)."""
        sub = self._subs[index]
        if not sub.active or index in self._updated:
            return
        grads = [sub.block.grad_of(k) for k in sub.keys]
        if all(g is None for g in grads):
            return
        hyper = [_hyper(self.optimizer.param_groups[gi]) for gi in sub.groups]
        if sub.optimizer is not None:
            for alias, p in zip(sub.aliases, sub.params):
                sub.optimizer.state[alias] = self.optimizer.state[p]  # the user's dict: init and updates land there
        if self.update_pass is not None:
            copies = sub.block.copy_views()
            for k, alias, g in zip(sub.keys, sub.aliases, grads):
                if g is not None:
                    self.update_pass.count(alias, g, None if copies is None else copies[k])
        self._updated.add(index)
        self.eager_updates += self._in_step  # queued during backward, not at the step
        self._futures[index] = self._worker.submit(index, self._update, sub, grads, hyper)

    def _update(self, sub: _BlockOptimizer, grads: list[Optional[Tensor]], hyper: list[dict]) -> None:
        start = host_clock()
        if sub.block.read_done is not None:
            wait_for(sub.block.read_done)  # no copy to the device still reads the weights this writes
        in_sync = sub.block.copy_current()
        try:
            if sub.optimizer is None:
                self._one_pass(sub, grads, hyper)
            else:
                self._same_class(sub, grads, hyper)
        finally:
            sub.block.updates += 1  # fused kernels do not bump tensor versions: the device slot must reload
        sub.block.copy_written(in_sync and sub.optimizer is None)
        self.update_ms.add((host_clock() - start) * 1e3)

    def _same_class(self, sub: _BlockOptimizer, grads: list[Optional[Tensor]], hyper: list[dict]) -> None:
        for group, h in zip(sub.optimizer.param_groups, hyper):
            group.update(h)  # the schedule's current learning rate, and any other change the user made
        for alias, g in zip(sub.aliases, grads):
            alias.grad = g
        try:
            sub.optimizer.step()
        finally:
            for alias in sub.aliases:
                alias.grad = None

    def _one_pass(self, sub: _BlockOptimizer, grads: list[Optional[Tensor]], hyper: list[dict]) -> None:
        """Each parameter's update in one pass, writing the block's compute-dtype copy as it goes."""
        copies = sub.block.copy_views()
        self.update_pass.update_many(self.optimizer, [
            (hyper[gi], p, alias, g, self.optimizer.state[p], None if copies is None else copies[k])
            for p, k, alias, g, gi in zip(sub.params, sub.keys, sub.aliases, grads, sub.group_of) if g is not None])

    def host_update_bytes(self) -> int:
        """Host bytes the one-pass updates read and wrote since the last call (0 for a same-class optimizer,
        whose passes are torch's to count)."""
        return 0 if self.update_pass is None else self.update_pass.take_bytes()

    def host_update_kernel_ms(self) -> Optional[float]:
        """Time the native one-pass kernel ran since the last call (timed without the GIL; None on other kernels):
        of :meth:`take_times`' worker time, the rest went to Python around it and to winning the GIL back."""
        return None if self.update_pass is None else self.update_pass.take_kernel_ms()

    def take_times(self) -> tuple[float, float]:
        """Worker time spent on block updates, and training time spent waiting for them, since the last call."""
        return self.update_ms.take(), self.wait_ms.take()

    # -- waiting -------------------------------------------------------------------------------------------
    def wait(self, index: int) -> None:
        """Block until block ``index``'s queued update has been written (before anyone reads its weights)."""
        fut = self._futures.pop(index, None)
        if fut is not None:
            start = host_clock()
            fut.result()
            self.wait_ms.add((host_clock() - start) * 1e3)

    def ready(self, index: int) -> bool:
        """Whether block ``index`` has no update still being written (one that finished is waited for here)."""
        fut = self._futures.get(index)
        if fut is not None and not fut.done():
            return False
        self.wait(index)
        return True

    def wait_all(self) -> None:
        for index in list(self._futures):
            self.wait(index)

    def close(self) -> None:
        """Finish queued updates and remove the hooks from the optimizer."""
        try:
            self.wait_all()
        finally:
            self._worker.shutdown()
            if self.update_pass is not None:
                self.update_pass.close()
            self._hooks.remove()
            for handle in self._state_hooks:
                handle.remove()
            self._unwrap_zero_grad()
            # the block optimizers alias the host buffers: let go of them now, not when a cycle is collected, so
            # the end of streaming frees each pinned chunk as soon as it is released (``streaming/host_release.py``)
            self._subs, self._block_params, self._stashed = [], [], []

    # -- inside optimizer.step and zero_grad ---------------------------------------------------------------
    @contextlib.contextmanager
    def _stepping_backward(self) -> Iterator[None]:
        """Around ``optimizer.step(closure)``'s closure: its backward's gradients are the step's."""
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False

    def _submit_all(self) -> None:
        """The step's gradients exist: queue every block not queued yet during backward, first block first (the
        next forward needs it first), and hide the block gradients from the optimizer's own update."""
        for index in range(len(self.blocks)):
            self.submit(index)
        self._updated.clear()
        self._stashed = [(p, p.grad) for p in self._block_params if p.grad is not None]
        for p, _ in self._stashed:
            p.grad = None  # the jobs hold them

    def _restore_grads(self) -> None:
        """After the step: the block gradients visible again (to callbacks, clipping logs), until ``zero_grad``."""
        stashed, self._stashed = self._stashed, []
        for p, g in stashed:
            p.grad = g

    def _before_zero(self, set_to_none: bool) -> None:
        if not set_to_none:
            self.wait_all()  # zeroing in place would rewrite gradients a queued update still reads

    def _after_zero(self, set_to_none: bool) -> None:
        for sub in self._subs:
            sub.block.clear_grads(sub.keys, set_to_none)
