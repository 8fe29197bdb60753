"""What torch's partitioner budget alone does to a model with compiled blocks: plain training (``peers.plain``),
the blocks compiled (``workloads.compiled``), under ``torch._functorch.config.activation_memory_budget`` = each of
``--budgets``, and block checkpointing for reference; one process per row, so that each compiles afresh.

    python benchmarks/partitioner_budget.py --model gpt_1b --budgets 1.0,0.7,0.5 --json out.json

Each row: the median step over the steps after ``--warmup`` (the first compiles), and the peak allocated bytes;
ratios to the first budget's. This is the peer ``compiled_activation_budget`` competes with, and the numbers
``planning/compiled_budget.py``'s ``LEAST`` rests on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

_ROW = "ROW "


def _one(model: str, budget: float, peer: str, steps: int, warmup: int) -> None:
    import torch

    from benchmarks.peers import run_peer
    from benchmarks.workloads import build, compiled
    from lightning_vdnn.integrations.adapters.torch import set_partitioner_budget

    set_partitioner_budget(budget)
    device = torch.device("cuda")
    w = compiled(build(model, device))
    clock = run_peer(peer, w, device, warmup + steps)
    print(_ROW + json.dumps({"peer": peer, "budget": budget, "step_s": statistics.median(clock.times[warmup:]),
                             "step_s_all": clock.times, "peak_alloc_bytes": torch.cuda.max_memory_allocated(device)}),
          flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt_1b")
    p.add_argument("--budgets", default="1.0,0.7,0.5", help="torch's partitioner budgets, each in [0, 1]")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-checkpoint", action="store_true", help="leave out the block checkpointing row")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--one", nargs=2, metavar=("BUDGET", "PEER"), help=argparse.SUPPRESS)  # a row's own process
    args = p.parse_args(argv)
    if args.one:
        _one(args.model, float(args.one[0]), args.one[1], args.steps, args.warmup)
        return 0
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        budgets = []
    if not budgets or any(not 0 <= b <= 1 for b in budgets):
        p.error(f"--budgets {args.budgets}: give budgets in [0, 1], e.g. 1.0,0.5")
    runs = [(b, "plain") for b in budgets] + ([] if args.no_checkpoint else [(1.0, "checkpoint")])
    rows = []
    for budget, peer in runs:
        cmd = [sys.executable, "-m", "benchmarks.partitioner_budget", "--model", args.model, "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--one", str(budget), peer]
        out = subprocess.run(cmd, capture_output=True, text=True)
        found = [line[len(_ROW):] for line in out.stdout.splitlines() if line.startswith(_ROW)]
        if not found:
            print(f"{peer} at {budget}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(found[0]))
    if not rows:
        return 1
    base = rows[0]
    print(f"| {args.model}, compiled blocks | torch's budget | step s | ratio | peak GiB | peak / first |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['peer']} | {r['budget']:g} | {r['step_s']:.4f} | {base['step_s'] / r['step_s']:.2f}x | "
              f"{r['peak_alloc_bytes'] / 2**30:.2f} | {r['peak_alloc_bytes'] / base['peak_alloc_bytes']:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
