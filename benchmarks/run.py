"""The benchmark suite's one entry point: every case in its own process, one table of ratios to plain.

    python benchmarks/run.py --model gpt_1b --out bench_out/gpt_1b --budget 25%,50%,75%
    python benchmarks/run.py --model gpt_tiny --tiny --out /tmp/bench   # CPU, seconds

Writes ``results.jsonl`` (one row per case, appended as each finishes), ``results.md`` and ``results.png``
into ``--out``. A case that fails is a row with its status (``OOM``, ``n/a: ...``, ``error: ...``,
``crashed: ...``, ``timeout ...``, ``skipped: ...``); the suite always goes on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.registry import BASELINE, CASES, SIZES, TINY, expand, parse_percent, split_case  # noqa: E402


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    cases = "\n".join(f"  {c.name:16s} {c.about}" for c in CASES.values())
    p = argparse.ArgumentParser(description=__doc__, epilog="cases:\n" + cases,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=list(SIZES))
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated; default: all")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 2 with --tiny)")
    p.add_argument("--budget", default="", help="e.g. 25%%,50%%,75%% of plain's peak, for modes that take one")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--tiny", action="store_true", help="the tiny size of --model, on the CPU, fp32")
    p.add_argument("--timeout", type=float, default=None, help="seconds per case (default 1200; 300 --tiny)")
    p.add_argument("--fail-case", default=None, help="debug: make this case crash, to test containment")
    args = p.parse_args(argv)
    try:
        args.budgets = [parse_percent(b) for b in _csv(args.budget)]
        args.cases = expand(_csv(args.cases), args.budgets)
        if args.fail_case:
            split_case(args.fail_case)
    except ValueError as exc:
        p.error(str(exc))
    if args.tiny:
        args.model = TINY[args.model]
    args.device = "cpu" if args.tiny else "cuda"
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 3)
    args.timeout = args.timeout or (300.0 if args.tiny else 1200.0)
    return args


def _budget_bytes(fraction: float, plain: Optional[dict]) -> Optional[int]:
    """P% of plain's peak allocated memory; of the device's capacity where plain measured no peak."""
    plain = plain or {}
    base = plain.get("peak_alloc_bytes") if plain.get("status") == "ok" else None
    base = base or plain.get("device_total_bytes")
    return int(fraction * base) if base else None


def _failed_row(case: str, status: str, proc_output: str = "") -> dict:
    return {"case": case, "status": status, "output_tail": proc_output[-4000:]}


def run_case(args: argparse.Namespace, case: str, plain: Optional[dict]) -> dict:
    """One case in a fresh ``python -m benchmarks.case`` process; its JSON row, or why there is none."""
    spec, fraction = split_case(case)
    if spec.needs_cuda and args.device != "cuda":
        return {"case": case, "status": "skipped: needs CUDA"}
    budget = None if fraction is None else _budget_bytes(fraction, plain)
    if fraction is not None and budget is None:
        return {"case": case, "status": "skipped: no budget base (plain measured neither peak nor capacity)"}
    cmd = [sys.executable, "-m", "benchmarks.case", "--case", case, "--model", args.model, "--device",
           args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--memory-budget", str(budget)] if budget is not None else []
    cmd += ["--inject-crash"] if case == args.fail_case else []
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return _failed_row(case, f"timeout after {args.timeout:g} s", out)
    from benchmarks.case import MARKER

    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if lines:
        return json.loads(lines[-1][len(MARKER):])
    code = proc.returncode
    why = f"signal {-code}{' (killed: host out of memory?)' if code == -9 else ''}" if code < 0 else f"exit {code}"
    return _failed_row(case, f"crashed: {why}", proc.stdout + proc.stderr)


def _notes(rows: list[dict]) -> list[str]:
    """What a reader of the table must know: Lightning's overhead, and where a budget came from."""
    by = {r["case"]: r for r in rows}
    plain_peak = by.get(BASELINE, {}).get("status") == "ok" and by[BASELINE].get("peak_alloc_bytes")
    capacity_used = not plain_peak and any(r.get("memory_budget") for r in rows)
    notes = []
    if by.get("lightning_plain", {}).get("time_ratio"):
        notes.append(f"Lightning's overhead over the raw loop (lightning_plain / plain step time): "
                     f"{by['lightning_plain']['time_ratio']:.3f}x.")
    if by.get(BASELINE, {}).get("status") != "ok":
        notes.append(f"plain did not run ({by.get(BASELINE, {}).get('status', 'not run')}): no ratios.")
    if capacity_used:
        notes.append("plain measured no device peak, so the @P% budgets are P% of the device's capacity.")
    return notes


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / "results.jsonl"
    jsonl.write_text("")
    rows, plain = [], None
    for case in args.cases:
        t0 = time.perf_counter()
        row = run_case(args, case, plain)
        plain = row if case == BASELINE else plain
        row = report.add_ratios(row, plain)
        rows.append(row)
        with jsonl.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{case:22s} {row['status'][:70]:70s} {time.perf_counter() - t0:6.1f} s", flush=True)
    (args.out / "results.md").write_text(report.markdown(rows, args.model, _notes(rows)))
    report.plot(rows, args.out / "results.png", args.model)
    print(f"wrote {jsonl}, results.md, results.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
