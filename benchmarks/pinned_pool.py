"""Does the offloader's pinned pool (``offload/host_pool.py``) beat torch's caching host allocator?

    python benchmarks/pinned_pool.py                        # CUDA: gpt_1b, batch 8 x 1024 tokens, 20 steps
    python benchmarks/pinned_pool.py --model vgg16 --batch 256 --seq 224   # VGG-16: sizes that are no powers of two
    python benchmarks/pinned_pool.py --batch 1 --seq 128    # CPU: pageable memory (no CUDA), says so

Replays the host side of a vDNN step: the sizes of the activations ``gpt_1b`` saves in one training step
(traced in bf16 on the GPU, or on the meta device without one; those of ``--min-bytes`` or more, as the
offloader moves them), each copied device -> host in forward order and host -> device in backward order on
side streams, its host buffer freed after its copy back. Two ways to get the host buffers, each in its own process:

* ``pool``: ``HostBufferPool`` (size classes of four per power of two, buffers kept and reused);
* ``torch``: ``torch.empty(n, dtype=uint8, pin_memory=True)`` per tensor, freed with ``del``: torch's caching
  host allocator (power-of-two blocks, reused once the copies that read them have completed).

Prints, for each, the first step (where both allocate) and the median of the later steps (ms), the host memory
held after the steps and the number of host allocations; ``--json PATH`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``lightning_vdnn`` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lightning_vdnn.offload.host_pool import HostBufferPool  # noqa: E402

MiB = 2**20


def saved_sizes(model: str, batch: int, seq: int, min_bytes: int, device: str) -> list[int]:
    """Bytes of each activation ``model`` saves for backward in one step, in the order forward saves them:
    traced on ``device`` ("cuda": the kernels a real step runs; "meta": no memory, but attention takes the math
    path there and saves its whole score matrix, which flash attention does not)."""
    from lightning_vdnn.examples.models.gpt import GPT, GPTConfig
    from lightning_vdnn.examples.models.vgg import VGG, VGGConfig

    vgg = model in VGGConfig.names()
    with torch.device("meta"):
        config = VGGConfig.from_name(model, image_size=seq) if vgg else GPTConfig.from_name(model, block_size=max(seq, 1))
        net = (VGG(config) if vgg else GPT(config)).to(torch.bfloat16)
    if device != "meta":
        net = net.to_empty(device=device)  # the weights' values do not change what is saved
    weights = {id(p) for p in net.parameters()}
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in weights and t.numel() * t.element_size() >= min_bytes:
            sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(torch.zeros(batch, 3, seq, seq, dtype=torch.bfloat16, device=device) if vgg
            else torch.zeros(batch, seq, dtype=torch.long, device=device))
    del net
    if device == "cuda":
        torch.cuda.empty_cache()
    return sizes


def run_variant(variant: str, sizes: list[int], steps: int) -> dict[str, Any]:
    """``steps`` host-side vDNN steps over ``sizes``; times and host memory of the ``variant`` allocator."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    scratch = torch.empty(max(sizes), dtype=torch.uint8, device=device)  # what the copies read and write
    pool = HostBufferPool(pin_memory=True) if variant == "pool" else None
    d2h = torch.cuda.Stream() if cuda else None
    h2d = torch.cuda.Stream() if cuda else None
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        held = _forward(sizes, scratch, pool, d2h, cuda)
        _backward(held, scratch, pool, d2h, h2d, cuda)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    row = {"variant": variant, "pinned": cuda, "first_ms": times[0],
           "steady_ms": statistics.median(times[1:]) if len(times) > 1 else times[0],
           "moved_gib_per_step": 2 * sum(sizes) / 2**30, "peak_rss_gib": _peak_rss() / 2**30}
    if pool is not None:
        row.update(held_gib=pool.reserved_bytes / 2**30, host_allocations=pool.allocations)
    elif cuda:
        stats = torch.cuda.host_memory_stats()
        row.update(held_gib=stats.get("allocated_bytes.current", 0) / 2**30,
                   host_allocations=stats.get("num_host_alloc", stats.get("allocations.allocated", 0)),
                   host_alloc_ms=stats.get("host_alloc_time.total", 0) / 1e3)
    return row


def _forward(sizes: list[int], scratch: torch.Tensor, pool: Any, d2h: Any, cuda: bool) -> list[tuple[Any, Any]]:
    held = []
    for n in sizes:
        if pool is not None:
            buf, ready = pool.acquire(n)
            buf = buf[:n]
            if cuda and ready is not None:
                d2h.wait_event(ready)
        else:
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=cuda)
        with torch.cuda.stream(d2h) if cuda else _Inline():
            buf.copy_(scratch[:n], non_blocking=cuda)
        held.append((buf, None))
    return held


def _backward(held: list[tuple[Any, Any]], scratch: torch.Tensor, pool: Any, d2h: Any, h2d: Any,
              cuda: bool) -> None:
    if cuda:
        h2d.wait_stream(d2h)
    while held:
        buf, _ = held.pop()
        with torch.cuda.stream(h2d) if cuda else _Inline():
            scratch[: buf.numel()].copy_(buf, non_blocking=cuda)
        if pool is not None:
            read = torch.cuda.Event() if cuda else None
            if cuda:
                read.record(h2d)
            pool.release(buf._base if buf._base is not None else buf, read)
        del buf  # torch: its block goes back to the caching host allocator once the copy has run


class _Inline:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt_1b")
    parser.add_argument("--batch", type=int, default=None, help="default 8 on CUDA, 1 on CPU")
    parser.add_argument("--seq", type=int, default=None, help="tokens (a VGG: image side); default 1024 on CUDA, 128 on CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--min-bytes", type=int, default=MiB, help="the offloader's min_offload_bytes")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--variant", choices=("pool", "torch"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    batch, seq = args.batch or (8 if cuda else 1), args.seq or (1024 if cuda else 128)
    sizes = saved_sizes(args.model, batch, seq, args.min_bytes, "cuda" if cuda else "meta")
    if not sizes:
        raise SystemExit(f"{args.model} at batch {batch} x {seq} saves nothing of {args.min_bytes} bytes or more.")
    if args.variant is not None:  # a child: one variant, one line of JSON
        print(json.dumps(run_variant(args.variant, sizes, args.steps)))
        return
    if not cuda:
        print("No CUDA device: host buffers are pageable (nothing is pinned), the copies are host memcpy and the "
              "sizes come from the meta device (attention's full score matrix included), so these numbers only "
              "show the script works; run it on a GPU machine to compare the allocators.")
    print(f"{args.model}, batch {batch} x {seq}: {len(sizes)} saved tensors per step, "
          f"{sum(sizes) / 2**30:.2f} GiB, {len(set(sizes))} distinct sizes; {args.steps} steps")
    rows = [_child(v, argv or sys.argv[1:]) for v in ("pool", "torch")]
    for r in rows:
        held = f"{r['held_gib']:.2f} GiB" if "held_gib" in r else "n/a (no CUDA: no host allocator stats)"
        print(f"{r['variant']:>5}: first step {r['first_ms']:9.1f} ms, later steps (median) {r['steady_ms']:9.1f} ms, "
              f"host memory held {held}, {r.get('host_allocations', 'n/a')} host allocations, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"batch": batch, "seq": seq, "rows": rows}, indent=1))


def _child(variant: str, argv: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *argv, "--variant", variant], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
