"""How fast the GPU machine's host memory is: the number that bounds L2L's step (``README.md``, run 10).

    python3 benchmarks/host_probe.py

Run 9 found torch's fused AdamW over gpt_1b's 1.21B block parameters taking 0.26 s alone and 0.56-0.58 s
beside pinned copies both ways (``run9_probe.py``): an update reads parameter, gradient and two moments and writes
three (28 bytes per parameter, 34 GB), so its time is host memory bandwidth, shared with the copies. This prints
that bandwidth (torch's multi-threaded copy and add over 1 GiB fp32 tensors, bytes read plus written), and the
AdamW pass's own rate for comparison.
"""

from __future__ import annotations

import time

import torch

GiB = 2**30


def rate(fn, moved: int, repeat: int = 5) -> float:
    """Best GB/s of ``repeat`` calls of ``fn`` that each move ``moved`` bytes through memory."""
    fn()
    best = min(_timed(fn) for _ in range(repeat))
    return moved / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    n = GiB // 4
    a, b, c = (torch.rand(n) for _ in range(3))
    threads = torch.get_num_threads()
    print(f"host threads {threads}")
    print(f"copy  (read 1 GiB, write 1 GiB):  {rate(lambda: b.copy_(a), 2 * GiB):6.1f} GB/s")
    print(f"add   (read 2 GiB, write 1 GiB):  {rate(lambda: torch.add(a, b, out=c), 3 * GiB):6.1f} GB/s")
    p = torch.nn.Parameter(torch.rand(n))
    p.grad = torch.rand(n)
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    adam = rate(opt.step, 28 * n)
    print(f"AdamW (fused, 28 bytes/param):    {adam:6.1f} GB/s (gpt_1b's 1.21B block parameters at this rate: "
          f"{28 * 1.21e9 / (adam * 1e9):.3f} s)")
    one_pass(n)


def one_pass(n: int) -> None:
    """L2L's host update (``streaming/host_update.py``) in each mode: bytes it moves per parameter, and its rate."""
    from lightning_vdnn.streaming.host_update import AdamPass, deepspeed_built

    opt = torch.optim.AdamW([torch.zeros(1)], lr=1e-4)
    w, g, copy = torch.rand(n), torch.rand(n) * 1e-3, torch.empty(n, dtype=torch.bfloat16)
    for backend in ("torch", "deepspeed") if deepspeed_built() else ("torch",):
        for moments in (torch.float32, torch.bfloat16):
            update, state = AdamPass(backend, moments), {}
            update.count(w, g, copy)
            per_param = update.take_bytes() / n
            best = rate(lambda: update.update(opt, opt.param_groups[0], w, w, g, state, copy), int(per_param * n))
            print(f"one pass {backend:9s} {str(moments)[6:]:8s} moments + bf16 copy ({per_param:.0f} bytes/param): "
                  f"{best:6.1f} GB/s, gpt_1b's 1.21B block parameters in {per_param * 1.21e9 / (best * 1e9):.3f} s")
            update.close()


if __name__ == "__main__":
    main()
