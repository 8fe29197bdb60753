"""The native one-pass Adam(W) kernel (``native_adam.cpp``): built on first use, as DeepSpeed builds its ops.

Per element it reads the fp32 master weight, the gradient (fp32 or bf16) and the two moments (fp32 or bf16), and
writes the weight, the moments and, if asked, the bf16 (or fp32) copy the device loads next: 28 bytes a parameter
with fp32 states (+2 for the copy), 18 with bf16 moments and gradients (+2), all in one pass, OpenMP-parallel over
elements, with the GIL released (the update runs on the host optimizer's worker thread).

With fp32 states it computes, bit for bit, what ``torch.optim.Adam(W)(fused=True)`` computes on the CPU (the C++
mirrors the operation order of torch's fused kernel; ``tests/test_native_adam.py``); with bf16 moments, what
widening them, that fp32 update and rounding back to nearest computes.

The build (``torch.utils.cpp_extension.load``, ``-O3 -march=native -fopenmp``, cached in torch's extension
directory under a name that includes this CPU's instruction sets and the source's hash) takes seconds; where it
fails (no C++ compiler, no ninja) :func:`load` warns once and returns None, and callers fall back to torch's kernel.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native_adam.cpp")
# -ffp-contract=off, -fno-math-errno: see native_adam.cpp; 512-bit vectors where the CPU has them (sqrt and divide
# per element make a few-core host compute-bound; IEEE operations round the same at any width)
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
_KINDS = {None: -1, torch.float32: 0, torch.bfloat16: 1}
#: Elements a thread takes at a time (the kernel's pieces), and the fewest worth a thread: fewer cost more in waking
#: it than they save (a bias, a norm). A multiple of 32: whole cache lines of every dtype here.
PIECE = 1 << 15
_lock = threading.Lock()
_loaded: dict[str, Any] = {}  # "module": the extension, or None after a failed build (warned once)


def load() -> Optional[Any]:
    """The compiled extension, built on the first call of the process; None (one warning) if the build fails."""
    with _lock:
        if "module" not in _loaded:
            try:
                _loaded["module"] = _build()
            except Exception as err:  # no compiler, no ninja, a compiler error: torch's kernel does the update
                _loaded["module"] = None
                warnings.warn(f"lightning_vdnn: the native host Adam kernel did not build ({type(err).__name__}: "
                              f"{str(err).strip()[:300]}); the host update uses torch's fused kernel instead "
                              "(slower: more passes over host memory). Install a C++ compiler (g++) and ninja to "
                              "build it.", RuntimeWarning, stacklevel=2)
        return _loaded["module"]


def _build() -> Any:
    from torch.utils.cpp_extension import load as load_extension

    with open(_SOURCE, "rb") as f:
        digest = hashlib.sha1(f.read() + _cpu_flags().encode() + " ".join(_FLAGS).encode()).hexdigest()[:12]
    # -march=native code runs on this CPU only: a home directory shared with other machines gets one build each
    return load_extension(f"lightning_vdnn_adam_{digest}", [_SOURCE], extra_cflags=_FLAGS,
                          extra_ldflags=["-fopenmp"], verbose=False)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def step(module: Any, weights: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, out: Optional[Tensor],
         *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
         step: float) -> None:
    """One Adam(W) step of ``weights`` in place (``step``: the count after this update, as torch keeps it).

    Raises:
        ValueError: a tensor that is not a contiguous CPU tensor of the right size and dtype (weights fp32,
            gradient and moments fp32 or bf16, the moments alike, ``out`` fp32 or bf16).
    """
    n = weights.numel()
    _check("weights", weights, n, (torch.float32,))
    _check("grad", grad, n, (torch.float32, torch.bfloat16))
    _check("exp_avg", exp_avg, n, (torch.float32, torch.bfloat16))
    _check("exp_avg_sq", exp_avg_sq, n, (exp_avg.dtype,))
    if out is not None:
        _check("out", out, n, (torch.float32, torch.bfloat16))
    count = torch.tensor(float(step) - 1.0)  # torch's float32 count, which the kernel takes to ``step``
    step_many(module, [(n, weights, grad, exp_avg, exp_avg_sq, out, count, (lr, beta1, beta2, eps, weight_decay,
                                                                          decoupled))])


#: One tensor's step for :func:`step_many`: its first ``n`` elements of weights, gradient, the two moments and
#: ``out`` (or None); its float32 step count; and (lr, beta1, beta2, eps, weight_decay, decoupled).
Part = tuple[int, Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Tensor, tuple[float, float, float, float, float,
                                                                                    bool]]


def step_many(module: Any, parts: Sequence[Part]) -> float:
    """:func:`step` for several tensors (a block's) in one pass: one parallel loop over all their pieces, and one
    release of the GIL. Each part's step count (torch's ``state["step"]``, a float32 CPU scalar) is incremented by
    the kernel first, as torch's Adam does before its update. Nothing between the tensors runs a torch op: a worker
    thread that releases the GIL (every torch op does) waits to win it back from a thread running Python, up to
    ``sys.getswitchinterval()`` each time. Returns the pass's own time in seconds (timed in C++, without the GIL).

    Raises:
        ValueError: as :func:`step`, for any part's tensors, and a step count that is not a float32 CPU scalar.
    """
    cols: list[list] = [[] for _ in range(9)]
    total = 0
    for n, weights, grad, exp_avg, exp_avg_sq, out, count, hyper in parts:
        _check("weights", weights, n, (torch.float32,), whole=False)
        _check("grad", grad, n, (torch.float32, torch.bfloat16), whole=False)
        _check("exp_avg", exp_avg, n, (torch.float32, torch.bfloat16), whole=False)
        _check("exp_avg_sq", exp_avg_sq, n, (exp_avg.dtype,), whole=False)
        if out is not None:
            _check("out", out, n, (torch.float32, torch.bfloat16), whole=False)
        if count.device.type != "cpu" or count.dtype != torch.float32 or count.numel() != 1:
            raise ValueError(f"native Adam: the step count must be a float32 CPU scalar; got {count.dtype} "
                             f"on {count.device}.")
        for col, value in zip(cols, (weights.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                                     0 if out is None else out.data_ptr(), n, count.data_ptr())):
            col.append(value)
        cols[7] += (_KINDS[grad.dtype], _KINDS[exp_avg.dtype], _KINDS[None if out is None else out.dtype])
        lr, beta1, beta2, eps, weight_decay, decoupled = hyper
        cols[8] += (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), float(decoupled))
        total += n
    w, g, m, v, o, ns, counts, kinds, scalars = cols
    return module.adam_step_many(w, g, m, v, o, ns, kinds, scalars, counts, max(1, min(torch.get_num_threads(),
                                                                                      total // PIECE)), PIECE)


def _check(name: str, t: Tensor, n: int, dtypes: tuple, whole: bool = True) -> None:
    """``t`` a contiguous CPU tensor of ``dtypes`` with ``n`` elements (at least ``n`` where not ``whole``)."""
    if (t.device.type != "cpu" or not t.is_contiguous() or (t.numel() != n if whole else t.numel() < n)
            or t.dtype not in dtypes):
        raise ValueError(f"native Adam: {name} must be a contiguous CPU tensor of {'' if whole else 'at least '}{n} "
                         f"elements in "
                         f"{' or '.join(str(d) for d in dtypes)}; got {tuple(t.shape)} {t.dtype} on {t.device}"
                         f"{'' if t.is_contiguous() else ', not contiguous'}.")
