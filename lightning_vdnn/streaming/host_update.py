"""One Adam(W) update of a streamed block's host weights, in one pass over host memory, with its byte count.

L2L's step is bound by host DRAM, not by arithmetic: an fp32 AdamW reads weight, gradient and two moments and
writes three (28 bytes a parameter). :class:`AdamPass` runs the update a cache-sized piece at a time, so that
whatever else the update needs is done while the piece is still in cache instead of in a second pass:

* the compute-dtype copy the device loads (bf16 for ``bf16-mixed``) is written from the fresh weights (2 bytes,
  instead of a later 4-byte read of the fp32 weights for every load);
* with ``state_dtype=torch.bfloat16`` the moments are kept in bf16 (the fp32 master weights stay): a piece is
  widened into fp32 scratch, updated, and rounded back to nearest, 8 bytes instead of 16 per parameter moved
  and held (the precision-aware optimizer recipe of Megatron-LM; see ``docs/streaming.md`` for its numerics).

Three kernels do the arithmetic: torch's fused CPU Adam(W) (``torch._fused_adam(w)_``, what
``torch.optim.AdamW(fused=True)`` runs, so ``"torch"`` with fp32 states is bit for bit that optimizer),
DeepSpeed's CPU Adam (``deepspeed.ops.op_builder.CPUAdamBuilder``, its AVX kernel; 0.19.8 has no update-and-copy
entry point and no fp32-weights/bf16-states pairing, hence the pieces), or ``"native"``, this package's own
(``streaming/native_adam.py``): the whole update, bf16 moments and gradients and the copy included, in one C++
pass with no pieces and no Python between them, bit for bit ``"torch"`` (fp32 states and bf16 ones alike).
:func:`choose_backend` times those that are built.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_vdnn.config import HOST_BACKENDS
from lightning_vdnn.streaming import native_adam
from lightning_vdnn.streaming.tally import Tally
from lightning_vdnn.units import host_clock

#: Host update backends (``VDNNConfig.host_optimizer``).
BACKENDS: tuple[str, ...] = HOST_BACKENDS
#: Precisions of Adam's moments in host memory (``VDNNConfig.host_state_dtype``).
STATE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: Elements per piece: its three fp32 scratch buffers (weights, moments) stay in a server CPU's last-level cache.
#: A multiple of every SIMD width, so a piece's vector/scalar split is the whole tensor's.
PIECE = 1 << 20
#: The native kernel leaves a tensor's last ``numel % TAIL`` elements to torch's kernel: torch computes a tensor's
#: last ``numel % width`` elements (its SIMD width, 8 or 16) with scalar code that its compiler rounds otherwise
#: (found by comparing bits), and a slice that short, starting on a whole vector, takes the same scalar code.
TAIL = 64
log = logging.getLogger(__name__)
_IDS = itertools.count(2**20)  # DeepSpeed's optimizer ids (its own DeepSpeedCPUAdam counts from 0)


#: One parameter's update for :meth:`AdamPass.update_many`: (group, param, host weights, gradient, its state dict,
#: the compute-dtype copy to write or None), :meth:`AdamPass.update`'s arguments.
Update = tuple[dict, Tensor, Tensor, Tensor, dict, Optional[Tensor]]


def fits(optimizer: Optimizer) -> bool:
    """Whether :class:`AdamPass` computes what ``optimizer`` would: torch's Adam or AdamW, no AMSGrad or
    ``maximize`` (the fused kernels take them, DeepSpeed's not; such groups keep the same-class optimizer)."""
    return type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and not any(
        g.get("amsgrad") or g.get("maximize") for g in optimizer.param_groups)


def _decoupled(optimizer: Optimizer, group: dict) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))


class AdamPass:
    """Adam(W) updates of host fp32 weights from their gradients, piece by piece (see the module docstring).

    Args:
        backend: ``"torch"``, ``"deepspeed"`` or ``"native"`` (``"torch"``, after one warning, where the native
            kernel does not build).
        state_dtype: dtype of the moments in host memory; fp32 states loaded from a checkpoint are narrowed on
            their first update, and torch widens bf16 ones when a plain optimizer loads them.
    """

    def __init__(self, backend: str, state_dtype: torch.dtype = torch.float32) -> None:
        if backend not in BACKENDS[1:]:
            raise ValueError(f"host_optimizer={backend!r} is not a backend; choose one of {list(BACKENDS[1:])}.")
        self._native = native_adam.load() if backend == "native" else None
        if backend == "native" and self._native is None:
            backend = "torch"  # the build failed: native_adam.load warned once
        self.backend, self.state_dtype = backend, state_dtype
        self.bytes = 0  # host bytes the updates queued since the last :meth:`take_bytes` read and write
        self.kernel_s = Tally()  # seconds inside the native pass since the last :meth:`take_kernel_ms`
        self._op, self._ids = (load_deepspeed() if backend == "deepspeed" else None), {}
        self._scratch: list[Tensor] = []

    def count(self, weights: Tensor, grad: Tensor, out: Optional[Tensor]) -> None:
        """Add one update's host bytes to :attr:`bytes`: it reads weights, gradient and two moments and writes
        weights, moments and ``out`` (fp32: 28 bytes a parameter, +2 for a bf16 copy; bf16 moments: 8 fewer).
        Counted when the update is queued, so that a step's count does not depend on the worker's timing."""
        state = self.state_dtype.itemsize
        self.bytes += weights.numel() * (2 * (weights.element_size() + 2 * state) + grad.element_size()
                                         + (out.element_size() if out is not None else 0))

    def take_bytes(self) -> int:
        moved, self.bytes = self.bytes, 0
        return moved

    def take_kernel_ms(self) -> Optional[float]:
        """Time the native pass itself ran since the last call, timed without the GIL (None on the other kernels,
        whose time is the caller's to take): against the worker's own clock, what it lost around the kernel."""
        if self._native is None:
            return None
        return self.kernel_s.take() * 1e3

    @torch.no_grad()
    def update(self, optimizer: Optimizer, group: dict, param: Tensor, weights: Tensor, grad: Tensor,
               state: dict, out: Optional[Tensor] = None) -> None:
        """One step of ``param`` (the user's, whose ``state`` dict this fills as torch's Adam does) from ``grad``
        on its host ``weights``; ``out``, if given, receives the new weights in its dtype."""
        self.update_many(optimizer, [(group, param, weights, grad, state, out)])

    @torch.no_grad()
    def update_many(self, optimizer: Optimizer, updates: Sequence[Update]) -> None:
        """:meth:`update` for each of ``updates`` (a block's parameters). With the native kernel, all in one pass
        (``native_adam.step_many``) that runs no torch op between the tensors once their state exists: the worker
        running it gives the GIL up once for the pass, not at every op (see ``native_adam.step_many``). A tensor's
        last ``numel % TAIL`` elements (:data:`TAIL`), a step count torch keeps in another dtype than float32, and
        every update on the other kernels go piece by piece."""
        parts, tails = [], []
        for group, param, weights, grad, state, out in updates:
            self._ready(state, weights)
            if self._native is None or state["step"].dtype != torch.float32 or not all(
                    t.is_contiguous() for t in (weights, grad, state["exp_avg"], state["exp_avg_sq"])):
                state["step"] += 1
                self._pieces(optimizer, group, state, weights.reshape(-1), grad.reshape(-1),
                             None if out is None else out.reshape(-1))
                continue
            n = weights.numel()
            main = n - n % TAIL
            native_out = out if out is None or out.dtype in (torch.float32, torch.bfloat16) else None
            beta1, beta2 = group["betas"]
            parts.append((main, weights, grad, state["exp_avg"], state["exp_avg_sq"], native_out, state["step"],
                          (_num(group["lr"]), _num(beta1), _num(beta2), group["eps"], group["weight_decay"],
                           _decoupled(optimizer, group))))
            if main < n or (out is not None and native_out is None):
                tails.append((group, state, weights, grad, out, native_out, main))
        if parts:
            self.kernel_s.add(native_adam.step_many(self._native, parts))  # counts each step first
        for group, state, weights, grad, out, native_out, main in tails:
            if main < weights.numel():
                self._pieces(optimizer, group, state, weights.reshape(-1), grad.reshape(-1),
                             None if native_out is None else native_out.reshape(-1), start=main)
            if out is not None and native_out is None:
                out.copy_(weights)  # fp16: the kernel writes bf16 and fp32 copies only

    def _pieces(self, optimizer: Optimizer, group: dict, state: dict, w: Tensor, g: Tensor, out: Optional[Tensor],
                start: int = 0) -> None:
        """Flat ``w[start:]``'s step (its count already taken) a :data:`PIECE` at a time on torch's or DeepSpeed's
        kernel."""
        m, v = (state[k].reshape(-1) for k in ("exp_avg", "exp_avg_sq"))
        for a in range(start, w.numel(), PIECE):
            b = min(a + PIECE, w.numel())
            self._piece(optimizer, group, state["step"], w[a:b], g[a:b], m[a:b], v[a:b],
                        out[a:b] if out is not None else None)

    def _ready(self, state: dict, weights: Tensor) -> None:
        """``state`` as the update needs it: moments made (first step) in the state dtype, a tensor step count."""
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(weights, dtype=self.state_dtype)
            state["exp_avg_sq"] = torch.zeros_like(weights, dtype=self.state_dtype)
        for key in ("exp_avg", "exp_avg_sq"):
            if state[key].dtype != self.state_dtype:  # a checkpoint's fp32 moments, or torch's widened ones
                state[key] = state[key].to(self.state_dtype)
        if not isinstance(state["step"], Tensor):
            state["step"] = torch.tensor(float(state["step"]))

    def _piece(self, optimizer: Optimizer, group: dict, step: Tensor, w: Tensor, g: Tensor, m: Tensor, v: Tensor,
               out: Optional[Tensor]) -> None:
        narrow = m.dtype != torch.float32
        m32, v32 = (self._wide(0, m), self._wide(1, v)) if narrow else (m, v)
        g32 = g if g.dtype == torch.float32 else self._wide(2, g)
        if self._op is not None:
            self._deepspeed(optimizer, group, step, w, g32, m32, v32)
        else:
            kernel = torch._fused_adamw_ if _decoupled(optimizer, group) else torch._fused_adam_
            beta1, beta2 = group["betas"]
            kernel([w], [g32], [m32], [v32], [], [step], lr=_num(group["lr"]), beta1=_num(beta1),
                   beta2=_num(beta2), weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                   maximize=False)
        if narrow:
            m.copy_(m32)  # round to nearest
            v.copy_(v32)
        if out is not None:
            out.copy_(w)

    def _wide(self, slot: int, t: Tensor) -> Tensor:
        while len(self._scratch) <= slot:
            self._scratch.append(torch.empty(PIECE, dtype=torch.float32))
        return self._scratch[slot][: t.numel()].copy_(t)

    def _deepspeed(self, optimizer: Optimizer, group: dict, step: Tensor, w: Tensor, g: Tensor, m: Tensor,
                   v: Tensor) -> None:
        decoupled = _decoupled(optimizer, group)
        beta1, beta2 = (_num(b) for b in group["betas"])
        key = (beta1, beta2, decoupled)  # ``group`` is a per-step snapshot: keyed by what DeepSpeed keeps
        if key not in self._ids:  # one DeepSpeed optimizer per pair of betas: it caches their powers
            self._ids[key] = next(_IDS)
            self._op.create_adam(self._ids[key], _num(group["lr"]), beta1, beta2, group["eps"],
                                 group["weight_decay"], decoupled, False)
        self._op.adam_update(self._ids[key], int(step.item()), _num(group["lr"]), beta1, beta2, group["eps"],
                             group["weight_decay"], True, w, g, m, v)

    def close(self) -> None:
        for opt_id in self._ids.values():
            self._op.destroy_adam(opt_id)
        self._ids = {}


def state_parameters(state_dtype: torch.dtype) -> float:
    """Adam's two moments in parameters' (fp32) worth, for the host memory check."""
    return 2 * state_dtype.itemsize / 4


def _num(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def load_deepspeed() -> Any:
    """DeepSpeed's CPU Adam extension (built on first use, cached in ``~/.cache/torch_extensions``)."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        return CPUAdamBuilder().load(verbose=False)
    except Exception as err:  # ImportError, or the build failed (no compiler, no ninja)
        raise RuntimeError(f"host_optimizer='deepspeed' needs DeepSpeed's cpu_adam extension, which failed to load "
                           f"({type(err).__name__}: {err}). Install deepspeed with a C++ compiler and ninja, or use "
                           "host_optimizer='torch'.") from err


def deepspeed_built() -> bool:
    """Whether DeepSpeed's CPU Adam is built already (installed prebuilt, or JIT-built in torch's extension
    cache): ``"auto"`` never starts a build, which takes minutes."""
    try:
        import importlib.util

        from deepspeed.ops.op_builder import CPUAdamBuilder
        from torch.utils.cpp_extension import _get_build_directory

        builder = CPUAdamBuilder()
        if importlib.util.find_spec(builder.absolute_name()) is not None:
            return True
        return os.path.exists(os.path.join(_get_build_directory(builder.name, False), builder.name + ".so"))
    except Exception:  # no deepspeed, or an op builder that names things otherwise
        return False


def choose_backend(state_dtype: torch.dtype, numel: int = 1 << 24, repeat: int = 3) -> str:
    """``"auto"`` with bf16 moments on a GPU run: the fastest one-pass update of ``numel`` parameters (best of
    ``repeat``, each writing the bf16 copy a ``bf16-mixed`` run loads) among ``"torch"``, ``"deepspeed"`` (when
    built: ``"auto"`` never starts its build, which takes minutes) and ``"native"`` (built here on first use, in
    seconds)."""
    candidates = ["torch"]
    if deepspeed_built():
        try:
            load_deepspeed()
            candidates.append("deepspeed")
        except RuntimeError:
            pass
    if native_adam.load() is not None:
        candidates.append("native")
    if len(candidates) == 1:
        return candidates[0]
    best = {backend: _time_update(backend, state_dtype, numel, repeat) for backend in candidates}
    chosen = min(best, key=best.get)
    log.info("lightning_vdnn: host update on %s (%s over %d parameters)", chosen,
             ", ".join(f"{b} {t * 1e3:.1f} ms" for b, t in best.items()), numel)
    return chosen


def _time_update(backend: str, state_dtype: torch.dtype, numel: int, repeat: int) -> float:
    """Best time of ``repeat`` updates of ``numel`` parameters with a bf16 copy (after one untimed)."""
    w, copy = torch.zeros(numel), torch.empty(numel, dtype=torch.bfloat16)
    g = torch.full((numel,), 1e-3, dtype=state_dtype)  # bf16 moments come with bf16 gradients (bf16_grads.py)
    param = torch.nn.Parameter(w)
    opt = torch.optim.AdamW([param], lr=1e-4)
    upd = AdamPass(backend, state_dtype)
    times = []
    for _ in range(repeat + 1):
        start = host_clock()
        upd.update(opt, opt.param_groups[0], param, w, g, opt.state[param], copy)
        times.append(host_clock() - start)
    upd.close()
    return min(times[1:])
