"""How fast the GPU machine's host memory is: the number that bounds L2L's step (``README.md``, run 10).

    python3 benchmarks/host_probe.py [--numel 268435456]

Run 9 found torch's fused AdamW over gpt_1b's 1.21B block parameters taking 0.26 s alone and 0.56-0.58 s
beside pinned copies both ways (``run9_probe.py``): an update reads parameter, gradient and two moments and writes
three (28 bytes per parameter, 34 GB), so its time is host memory bandwidth, shared with the copies. This prints
that bandwidth (torch's multi-threaded copy and add over 1 GiB fp32 tensors, bytes read plus written), and the
AdamW pass's own rate for comparison; then each host update of ``streaming/host_update.py`` over ``--numel``
parameters: torch's fused AdamW followed by a separate bf16 copy (what ``"auto"``'s same-class optimizer and a
load's cast do), and the one pass on each backend (torch's pieces, DeepSpeed's if built, the native kernel), fp32
and bf16 moments, in GB/s of host traffic (bytes read plus written, as ``memory_report()`` counts them).
"""

from __future__ import annotations

import argparse
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=GiB // 4, help="elements per tensor (default 2^28)")
    n = parser.parse_args().numel
    bandwidth(n)  # its tensors freed before the one pass allocates its own
    one_pass(n)


def bandwidth(n: int) -> None:
    """Copy and add rates, torch's fused AdamW alone and followed by a separate bf16 copy."""
    a, b, c = (torch.rand(n) for _ in range(3))
    threads = torch.get_num_threads()
    print(f"host threads {threads}")
    size = 4 * n  # bytes per fp32 tensor
    print(f"copy  (read {size / GiB:g} GiB, write {size / GiB:g} GiB):  {rate(lambda: b.copy_(a), 2 * size):6.1f} GB/s")
    print(f"add   (read {2 * size / GiB:g} GiB, write {size / GiB:g} GiB):  "
          f"{rate(lambda: torch.add(a, b, out=c), 3 * size):6.1f} GB/s")
    p = torch.nn.Parameter(torch.rand(n))
    p.grad = torch.rand(n)
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    adam = rate(opt.step, 28 * n)
    print(f"AdamW (fused, 28 bytes/param):    {adam:6.1f} GB/s (gpt_1b's 1.21B block parameters at this rate: "
          f"{28 * 1.21e9 / (adam * 1e9):.3f} s)")
    copy = torch.empty(n, dtype=torch.bfloat16)

    def fused_then_copy() -> None:
        opt.step()
        copy.copy_(p.detach())

    both = rate(fused_then_copy, 34 * n)  # the copy reads 4 bytes and writes 2
    print(f"AdamW fused + separate bf16 copy (34 bytes/param): {both:6.1f} GB/s, gpt_1b's 1.21B block parameters "
          f"in {34 * 1.21e9 / (both * 1e9):.3f} s")


def one_pass(n: int) -> None:
    """L2L's host update (``streaming/host_update.py``) in each mode: bytes it moves per parameter, and its rate."""
    from lightning_vdnn.streaming import native_adam
    from lightning_vdnn.streaming.host_update import AdamPass, deepspeed_built

    opt = torch.optim.AdamW([torch.zeros(1)], lr=1e-4)
    w, copy = torch.rand(n), torch.empty(n, dtype=torch.bfloat16)
    backends = ["torch"] + ["deepspeed"] * deepspeed_built() + ["native"] * (native_adam.load() is not None)
    for backend in backends:
        for moments in (torch.float32, torch.bfloat16):
            g = torch.rand(n, dtype=moments) * 1e-3  # bf16 moments come with bf16 gradients (bf16_grads.py)
            update, state = AdamPass(backend, moments), {}
            update.count(w, g, copy)
            per_param = update.take_bytes() / n
            best = rate(lambda: update.update(opt, opt.param_groups[0], w, w, g, state, copy), int(per_param * n))
            print(f"one pass {backend:9s} {str(moments)[6:]:8s} moments + bf16 copy ({per_param:.0f} bytes/param): "
                  f"{best:6.1f} GB/s, gpt_1b's 1.21B block parameters in {per_param * 1.21e9 / (best * 1e9):.3f} s")
            update.close()


if __name__ == "__main__":
    main()
