"""How long one block's host update takes beside a thread running Python, tensor by tensor or in one pass.

    python benchmarks/host_update_gil.py --width 1024 --repeat 3

Layer streaming updates each block on a worker thread while the training thread drives the GPU. Every torch op
the worker runs gives up the GIL and must win it back from that thread, which holds it for up to
``sys.getswitchinterval()`` (5 ms) while it runs Python. This times the update of one GPT block's parameters (the
native kernel, bf16 copy written) on the worker: alone, beside a thread running small torch ops with Python between
them (a training thread's pattern), and beside one running Python only; ``AdamPass.update`` per tensor (a native
pass each) against ``AdamPass.update_many`` (one native pass, no torch op between the tensors), with the one
pass's own time in brackets (the kernel's clock, without the GIL: the rest is the wait to win it back).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_vdnn.streaming import native_adam  # noqa: E402
from lightning_vdnn.streaming.host_update import AdamPass  # noqa: E402

LOADS = ("idle", "torch ops", "python")


def block_shapes(h: int) -> list[tuple[int, ...]]:
    """A GPT block's parameters: two LayerNorms, qkv, attention projection, MLP up and down, with biases."""
    return [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,)]


def beside(work, load: str) -> float:
    """Seconds ``work()`` takes on a worker thread while this thread runs ``load``."""
    took: list[float] = []

    def run() -> None:
        start = time.perf_counter()
        work()
        took.append(time.perf_counter() - start)

    worker = threading.Thread(target=run)
    small, x = torch.zeros(16), 0
    worker.start()
    while worker.is_alive():
        if load == "python":
            for _ in range(2000):
                x += 1
        elif load == "torch ops":
            for _ in range(50):
                small.add_(1)
                x += sum(range(20))
        else:
            time.sleep(0.0005)
    worker.join()
    return took[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024, help="the block's hidden width h (default 1024)")
    p.add_argument("--blocks", type=int, default=10, help="block updates timed per measurement (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="measurements per row (default 3)")
    p.add_argument("--state", choices=("fp32", "bf16"), default="bf16", help="Adam's moments (default bf16)")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="seconds: Python's GIL switch interval (default: Python's, 0.005)")
    args = p.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if native_adam.load() is None:
        p.error("the native kernel did not build here (a C++ compiler and ninja are needed)")
    state_dtype = torch.float32 if args.state == "fp32" else torch.bfloat16
    shapes = block_shapes(args.width)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [torch.randn(s).to(state_dtype) for s in shapes]
    copies = [torch.empty(s, dtype=torch.bfloat16) for s in shapes]
    opt = torch.optim.AdamW(params, lr=1e-4)
    update = AdamPass("native", state_dtype)
    todo = [(opt.param_groups[0], q, q.detach(), g, opt.state[q], c) for q, g, c in zip(params, grads, copies)]

    def each() -> None:
        for _ in range(args.blocks):
            for item in todo:
                update.update(opt, *item)

    def one_pass() -> None:
        for _ in range(args.blocks):
            update.update_many(opt, todo)

    one_pass()  # the state made, the kernel warm
    numel = sum(q.numel() for q in params)
    print(f"one block: {numel / 1e6:.2f}M parameters, {args.state} moments, {torch.get_num_threads()} threads; "
          f"GIL switch interval {sys.getswitchinterval() * 1e3:g} ms; ms per block update, {args.repeat} measurements "
          f"of {args.blocks} blocks")
    print("| beside | tensor by tensor | one pass (its kernel) |\n|---|---|---|")

    def measure(work, load: str) -> str:
        update.take_kernel_ms()
        took = beside(work, load) / args.blocks * 1e3
        return f"{took:.1f}" if work is each else f"{took:.1f} ({update.take_kernel_ms() / args.blocks:.1f})"

    for load in LOADS:
        rows = [" ".join(measure(work, load) for _ in range(args.repeat)) for work in (each, one_pass)]
        print(f"| {load} | {rows[0]} | {rows[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
