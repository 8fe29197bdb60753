"""Solve a GPU run's activation plan again on any machine, from what its planner planned from.

    python benchmarks/replan.py results/h200-run20/vgg/results.jsonl --case vdnn@70%
    python benchmarks/replan.py results.jsonl --case vdnn@70% --slack 0 --budget 0.6

A row of ``run.py`` keeps the ``"auto"`` planner's last inputs (``planner_inputs``: the layer profiles, the
floor, the budget, the slack that overshoots added, the plan). This solves them again
(``planning.activation_plan.solve_planned``, as the planner does), with the slack and budget as they were or as given, and prints
each plan beside the one the run took: what it keeps, offloads and recomputes, and its predicted peak and time.
Where the row has the last watched step's memory samples (``memory_report.timeline``), it also prints the
measured device memory at each layer call of forward and backward. The inputs are a pickle, which can run code
when loaded: give it only rows your own runs wrote.
"""

from __future__ import annotations

import argparse
import base64
import json
import pickle
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_vdnn.planning.activation_plan import solve_planned  # noqa: E402
from lightning_vdnn.planning.activation_solver import Plan  # noqa: E402
from lightning_vdnn.report.memory_report import layer_ranges  # noqa: E402

GB = 1e9


def describe(name: str, plan: Plan) -> str:
    segments = ", ".join(f"{a}-{b - 1}" for a, b in plan.segments) or "none"
    return (f"{name}: predicted peak {plan.predicted_peak / 1e6:.3f} MB (budget {plan.budget / 1e6:.1f} MB), adds "
            f"{plan.added_ms:.1f} ms ({plan.exposed_copy_ms:.1f} exposed copies)\n"
            f"  kept {len(plan.kept)}: {layer_ranges(sorted(plan.kept - plan.recomputed)) or '-'}\n"
            f"  offloaded {len(plan.offloaded)}: {layer_ranges(plan.offloaded) or '-'}\n"
            f"  recomputed {len(plan.recomputed)} (selective {len(plan.selective)}): "
            f"{layer_ranges(sorted(plan.recomputed)) or '-'}; segments {segments}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a results.jsonl of benchmarks/run.py")
    p.add_argument("--case", required=True)
    p.add_argument("--slack", type=float, default=None, help="GB added to the floor (default: the run's)")
    p.add_argument("--overcount", type=float, default=0.0,
                   help="GB to lower the profiled forward peak by (default 0: as the planner solved it)")
    p.add_argument("--budget", type=float, default=None,
                   help="a fraction of the run's budget (<= 4) or bytes (default: the run's)")
    p.add_argument("--no-link", action="store_true", help="time copies per layer only (no copy-link plans)")
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    row = next((r for r in rows if r["case"] == args.case), None)
    if row is None or "planner_inputs" not in row:
        p.error(f"{args.case!r}: no such row with the planner's inputs in {args.results}")
    state = pickle.loads(base64.b64decode(row["planner_inputs"]))
    layers, floor, budget = state["layers"], state["floor"], state["budget"]
    slack = state["slack"] if args.slack is None else int(args.slack * GB)
    overcount = int(args.overcount * GB)
    forward = None if state["forward_peak"] is None else state["forward_peak"] - overcount  # as if counted twice
    if args.budget is not None:
        budget = int(args.budget * budget) if args.budget <= 4 else int(args.budget)
    print(f"{len(layers)} layers, floor {floor / GB:.3f} GB, forward peak "
          f"{(state['forward_peak'] or 0) / GB:.3f} GB, run's slack {state['slack'] / GB:.3f} GB, "
          f"re-plans {state['replans']}, copy link {'on' if state.get('link', True) else 'off'}")
    print(describe("the run's plan", state["plan"]))
    solved = solve_planned(layers, floor, budget, state["granule"], forward, slack,
                           state.get("link", True) and not args.no_link)
    print(describe(f"solved again (slack {slack / GB:.3f} GB, forward peak lowered by {overcount / GB:.3f} GB)",
                   solved))
    samples = (row.get("memory_report") or {}).get("timeline") or []
    runs: list[list] = []  # consecutive samples of one layer and phase: [phase, layer, most bytes]
    for sample in samples:
        if runs and runs[-1][:2] == [sample["phase"], sample["layer"]]:
            runs[-1][2] = max(runs[-1][2], sample["allocated_bytes"])
        else:
            runs.append([sample["phase"], sample["layer"], sample["allocated_bytes"]])
    if runs:
        print("device memory through the last watched step (GB allocated; per layer call, in order):")
        for phase in ("forward", "backward"):
            print(f"  {phase}: " + " ".join(f"{n / GB:.2f}" for ph, _, n in runs if ph == phase))
    return 0


if __name__ == "__main__":
    sys.exit(main())
