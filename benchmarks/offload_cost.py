"""What offloading chosen blocks costs a step, with nothing else in it: no recompute, no planner, no Lightning.

    python benchmarks/offload_cost.py                  # CUDA: gpt_1b, batch 8 x 1024, bf16 autocast
    python benchmarks/offload_cost.py --model gpt_tiny # CPU: seconds (copies inline)

The model's blocks are the offloader's layers (``ActivationOffloader.attach(model, blocks)``); each row keeps every
block's saves on the device except those of the blocks it names, which go to the host (1 GiB of copies in flight
let through per block named, ``set_plan(..., inflight_bytes=)``: a gpt_1b block saves 0.9 GB, so compute need not
wait for them). Per row, medians of
``--steps`` steps after 3: how long the host took to queue forward, how long the device took to run forward and
backward (CUDA events), the whole step (synchronized), how often compute waited for a copy anyway, and the bytes
the last step moved to the host.

Without a memory budget the copies may run past the end of forward, into backward: what they cost here is their
time, not what they free (``planning/copy_link.py``'s model says which fit in forward, where they free memory
at the step's peak). ``--json PATH`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``lightning_vdnn`` and ``benchmarks`` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.workloads import SIZES, build  # noqa: E402
from lightning_vdnn.offload import inflight  # noqa: E402
from lightning_vdnn.offload.offloader import ActivationOffloader  # noqa: E402

#: (row, blocks offloaded): none, one, adjacent early ones, adjacent later ones, spread ones.
ROWS = (("none", ()), ("b0", (0,)), ("b0-1", (0, 1)), ("b10-11", (10, 11)), ("b0,b12", (0, 12)),
        ("b5,b15", (5, 15)), ("b3,b11,b19", (3, 11, 19)), ("b0-2", (0, 1, 2)),
        ("every 4th (6)", tuple(range(0, 24, 4))), ("every 3rd (8)", tuple(range(0, 24, 3))), ("none again", ()))


class Waits:
    """Counts the times compute waited for a copy to the host (``CopiesInFlight``'s back-pressure)."""

    def __init__(self) -> None:
        self.count, self._throttle = 0, inflight.CopiesInFlight._throttle

    def __enter__(self) -> "Waits":
        def throttle(copies, timeline):
            before = len(copies._pending)
            self._throttle(copies, timeline)
            self.count += before - len(copies._pending)

        inflight.CopiesInFlight._throttle = throttle
        return self

    def __exit__(self, *exc: object) -> None:
        inflight.CopiesInFlight._throttle = self._throttle


def measure(model: str, steps: int, min_offload_bytes: int = 2**20) -> list[dict]:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    w = build(model, device)
    net = w.model.to(device)
    blocks = net.blocks
    off = ActivationOffloader(device, policy="all", min_offload_bytes=min_offload_bytes)
    off.attach(net, blocks)
    cuda = device.type == "cuda"

    def event():
        e = torch.cuda.Event(enable_timing=True) if cuda else None
        if e is not None:
            e.record()
        return e

    def step() -> tuple[float, float, float, float]:
        t0, start = time.perf_counter(), event()
        with off.capture(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = w.loss(net, w.batch)
        host, forward = (time.perf_counter() - t0) * 1e3, event()
        loss.backward()
        backward = event()
        off.finish_pass()
        net.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        ms = (lambda a, b: a.elapsed_time(b)) if cuda else (lambda a, b: 0.0)
        return host, ms(start, forward), ms(forward, backward), (time.perf_counter() - t0) * 1e3

    rows = []
    with Waits() as waits:
        for name, chosen in ROWS:
            chosen = tuple(b for b in chosen if b < len(blocks))
            layers = frozenset(b + 1 for b in chosen)  # layer 0: before the first block
            off.set_plan(frozenset(range(len(blocks) + 1)) - layers, inflight_bytes=len(chosen) * 2**30)
            step()  # the plan's bound on copies in flight starts with the next pass
            waits.count = 0
            timed = [step() for _ in range(steps + 3)][3:]
            med = [statistics.median(c) for c in zip(*timed)]
            rows.append(dict(row=name, blocks=list(chosen), forward_host_ms=med[0], forward_device_ms=med[1],
                             backward_device_ms=med[2], step_ms=med[3], copy_waits_per_step=waits.count / (steps + 3),
                             offloaded_bytes=off.report().offloaded_bytes))
            print(f"{name:14s} forward host {med[0]:6.1f} ms, device {med[1]:6.1f} ms; backward device "
                  f"{med[2]:6.1f} ms; step {med[3]:6.1f} ms; compute waited for copies {rows[-1]['copy_waits_per_step']:.1f}"
                  " times a step", flush=True)
    off.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt_1b" if torch.cuda.is_available() else "gpt_tiny", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=7, help="timed steps per row, after 3 untimed")
    p.add_argument("--min-offload-bytes", type=int, default=2**20,
                   help="smaller saves stay on the device (the strategies' default, 1 MiB)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: give 1 or more.")
    rows = measure(args.model, args.steps, args.min_offload_bytes)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
