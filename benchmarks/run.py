"""The benchmark suite's one entry point: every case in its own process, one table of ratios to plain.

    python benchmarks/run.py --model gpt_1b --out bench_out/gpt_1b --budget 25%,50%,75%
    python benchmarks/run.py --model gpt_tiny --tiny --out /tmp/bench   # CPU, seconds
    python benchmarks/run.py --model gpt_1b --compile --cases plain,vdnn_all,vdnn@75% --out bench_out/compiled
    python benchmarks/run.py --model gpt_1b --devices 2 --cases plain,zero3_offload,vdnn_zero3 --out bench_out/x2

With ``--devices N`` every case runs data parallel on N devices under ``torchrun`` (same per-device batch, so
its per-device throughput compares with a one-device run); a single-device strategy's row says ``n/a``.

Writes ``results.jsonl`` (one row per case, appended as each finishes), ``results.md`` and ``results.png``
into ``--out``. A case that fails is a row with its status (``OOM``, ``n/a: ...``, ``error: ...``,
``crashed: ...``, ``timeout ...``, ``skipped: ...``); the suite always goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.registry import (  # noqa: E402
    BASELINE, CASES, SIZES, TINY, devices_status, expand, parse_percent, split_case,
)
from benchmarks.step_profile import profiled_step  # noqa: E402  (torch-free, as the two above)

#: Seconds a timed-out case gets to stop after SIGTERM (torchrun passes it on to its ranks) before SIGKILL.
GRACE_S = 45


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    cases = "\n".join(f"  {c.name:16s} {c.about}" for c in CASES.values())
    p = argparse.ArgumentParser(description=__doc__, epilog="cases:\n" + cases,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt_1b", choices=list(SIZES), help="default gpt_1b (gpt_tiny with --tiny)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated; default: all")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 2 with --tiny)")
    p.add_argument("--settle", type=int, default=None,
                   help="Lightning cases: up to this many extra steps while the 'auto' planner still measures "
                        "steps (profiling, checking a plan), which then stay out of the median; with --profile, "
                        "the profiled step is the one after (default 8; 0 with --tiny or --profile-step)")
    p.add_argument("--budget", default="", help="e.g. 25%%,50%%,75%% of plain's peak, for modes that take one")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--tiny", action="store_true", help="the tiny size of --model, on the CPU, fp32")
    p.add_argument("--devices", type=int, default=1,
                   help="data-parallel devices per case (default 1); N>1 launches each case with torchrun")
    p.add_argument("--timeout", type=float, default=None, help="seconds per case (default 1200; 300 --tiny)")
    p.add_argument("--compile", action="store_true",
                   help="every case and peer with the model's blocks compiled (block.compile(); VGG whole), "
                        "ratios against compiled plain; warm-up steps take the compilation")
    p.add_argument("--device-gib", type=float, default=None,
                   help="every case but plain may hold at most this many GiB of the device, as on a smaller GPU "
                        "(plain, the baseline, runs on the whole device: the GPU big enough to hold the model); a case "
                        "whose memory, the allocator's cache included, does not fit there retries or OOMs")
    p.add_argument("--fail-case", default=None, help="debug: make this case crash, to test containment")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="seconds: each case's GIL switch interval (benchmarks/case.py; Python's default 0.005)")
    p.add_argument("--profile", action="store_true",
                   help="each case runs one extra, untimed step under torch.profiler; results.md gets a table of "
                        "where that step's time goes (PCIe copies hidden or exposed, GPU idle, host ops)")
    p.add_argument("--profile-step", type=int, default=None,
                   help="which step to profile, 0-based over warm-up + timed + 1 (default: the last); "
                        "implies --profile")
    p.add_argument("--trace-dir", type=Path, default=None,
                   help="also write each case's profiled step as a Chrome trace here; implies --profile")
    args = p.parse_args(argv)
    try:
        args.budgets = [parse_percent(b) for b in _csv(args.budget)]
        args.cases = expand(_csv(args.cases), args.budgets)
        if args.fail_case:
            split_case(args.fail_case)
    except ValueError as exc:
        p.error(str(exc))
    if args.device_gib is not None and args.device_gib <= 0:
        p.error(f"--device-gib {args.device_gib:g}: give a size in GiB above 0.")
    if args.devices < 1:
        p.error(f"--devices {args.devices}: give the number of devices per case, 1 or more.")
    if args.tiny:
        args.model = TINY[args.model]
    args.device = "cpu" if args.tiny else "cuda"
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 3)
    args.settle = args.settle if args.settle is not None else (0 if args.tiny or args.profile_step is not None else 8)
    if args.settle < 0:
        p.error(f"--settle {args.settle}: give a number of extra steps, 0 or more.")
    args.timeout = args.timeout or (300.0 if args.tiny else 1200.0)
    args.profile = args.profile or args.profile_step is not None or args.trace_dir is not None
    if args.profile:
        try:
            profiled_step(args.warmup, args.steps, args.profile_step)
        except ValueError as exc:
            p.error(str(exc))
    args.trace_dir = args.trace_dir.resolve() if args.trace_dir else None  # a case runs in the repository root
    return args


def _budget_bytes(fraction: float, plain: Optional[dict]) -> Optional[int]:
    """P% of plain's peak allocated memory; of the device's capacity where plain measured no peak."""
    plain = plain or {}
    base = plain.get("peak_alloc_bytes") if plain.get("status") == "ok" else None
    base = base or plain.get("device_total_bytes")
    return int(fraction * base) if base else None


def _failed_row(case: str, status: str, proc_output: str = "") -> dict:
    return {"case": case, "status": status, "output_tail": proc_output[-4000:]}


def case_command(args: argparse.Namespace, case: str, budget: Optional[int]) -> list[str]:
    """``python -m benchmarks.case ...``; under ``torchrun`` (as a module of this Python) with ``--devices N``."""
    launch = [sys.executable, "-m"]
    if args.devices > 1:
        launch += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(args.devices), "-m"]
    cmd = launch + ["benchmarks.case", "--case", case, "--model", args.model, "--device", args.device,
                    "--devices", str(args.devices), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--memory-budget", str(budget)] if budget is not None else []
    cmd += ["--profile"] if args.profile else []
    cmd += ["--settle", str(args.settle)]
    cmd += ["--switch-interval", f"{args.switch_interval:g}"] if args.switch_interval is not None else []
    cmd += ["--compile"] if args.compile else []
    cmd += ["--device-gib", f"{args.device_gib:g}"] if args.device_gib is not None and case != BASELINE else []
    cmd += ["--profile-step", str(args.profile_step)] if args.profile_step is not None else []
    cmd += ["--trace-dir", str(args.trace_dir)] if args.trace_dir is not None else []
    return cmd + (["--inject-crash"] if case == args.fail_case else [])


def _environment(args: argparse.Namespace) -> dict:
    """A ``--tiny`` case sees no GPU, and DeepSpeed picks its CPU accelerator (it reads this once, on import).
    With N devices each rank gets 1/N of the host's cores for its CPU work (DeepSpeed's CPU Adam among it),
    unless OMP_NUM_THREADS is set: torchrun would give each rank one thread, DeepSpeed's launcher all cores."""
    env = dict(os.environ)
    if args.tiny:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    if args.devices > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // args.devices))
    return env


def _launch(cmd: list[str], env: dict, timeout: float) -> tuple[Optional[int], str, str]:
    """Run ``cmd``: its exit code (None if it timed out), stdout and stderr. A case past ``timeout`` gets
    SIGTERM, which torchrun passes on to its ranks, then SIGKILL after ``GRACE_S``."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return None, out, err


def _result(stdout: str) -> Optional[dict]:
    """The last ``MARKER`` line that parses (a line another rank wrote into is passed over)."""
    from benchmarks.case import MARKER

    for line in reversed(stdout.splitlines()):
        _, found, text = line.partition(MARKER)
        if found:
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                continue
    return None


def run_case(args: argparse.Namespace, case: str, plain: Optional[dict]) -> dict:
    """One case in a fresh ``python -m benchmarks.case`` process (N under torchrun); its JSON row, or why
    there is none."""
    spec, fraction = split_case(case)
    refusal = devices_status(spec, args.devices)
    if refusal:
        return {"case": case, "status": refusal}
    budget = None if fraction is None else _budget_bytes(fraction, plain)
    if fraction is not None and budget is None:
        return {"case": case, "status": "skipped: no budget base (plain measured neither peak nor capacity)"}
    code, out, err = _launch(case_command(args, case, budget), _environment(args), args.timeout)
    row = _result(out)
    if row is not None:  # with the strategy's own lines (the plans it made, in order)
        return {**row, "log": [line for line in (out + err).splitlines() if line.startswith("lightning_vdnn")]}
    if code is None:
        return _failed_row(case, f"timeout after {args.timeout:g} s", out + err)
    return _failed_row(case, f"crashed: {_crash(code, err)}", out + err)


_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def _crash(code: int, stderr: str) -> str:
    """How the process ended; under torchrun, how its first failing rank did (torchrun itself exits 1)."""
    cause = _ROOT_CAUSE.search(stderr)
    rank = ""
    if cause:
        rank, code = f" (rank {cause.group(1)})", int(cause.group(2))
    if code < 0:
        return f"signal {-code}{' (killed: host out of memory?)' if code == -9 else ''}{rank}"
    return f"exit {code}{rank}"


def _notes(rows: list[dict]) -> list[str]:
    """What a reader of the table must know: Lightning's overhead, and where a budget came from."""
    by = {r["case"]: r for r in rows}
    plain_peak = by.get(BASELINE, {}).get("status") == "ok" and by[BASELINE].get("peak_alloc_bytes")
    capacity_used = not plain_peak and any(r.get("memory_budget") for r in rows)
    notes = []
    if by.get("lightning_plain", {}).get("time_ratio"):
        notes.append(f"Lightning's overhead over the raw loop (lightning_plain / plain step time): "
                     f"{by['lightning_plain']['time_ratio']:.3f}x.")
    if any(r.get("compiled") for r in rows):
        notes.append("--compile: every case and peer ran with the model's blocks compiled (block.compile()), "
                     "ratios are to compiled plain.")
    if by.get(BASELINE, {}).get("status") != "ok":
        notes.append(f"plain did not run ({by.get(BASELINE, {}).get('status', 'not run')}): no ratios.")
    if capacity_used:
        notes.append("plain measured no device peak, so the @P% budgets are P% of the device's capacity.")
    later = [f"{r['case']} ({r['warmup_steps']}, {r['planning_steps']} measured by the planner)" for r in rows
             if r.get("status") == "ok" and r.get("planning_steps") and r.get("warmup_steps", 0) > r.get("warmup", 0)]
    if later:
        notes.append("Medians start after the steps the 'auto' planner measured (--settle): warm-up steps of "
                     + ", ".join(later) + ".")
    if any(r.get("unsettled") for r in rows):
        notes.append("Not settled within --settle: " + ", ".join(r["case"] for r in rows if r.get("unsettled"))
                     + " (the planner measured every step; their medians include its steps).")
    devices = report.devices_of(rows)
    if devices > 1:
        notes.append(
            f"Data parallel on {devices} devices, each with the one-device batch: per-device throughput compares "
            f"directly with a --devices 1 run; total = {devices} x per device. Step time: per step the slowest "
            "rank. Peak GPU memory: the largest over the ranks (each GPU's). Host RSS: the sum over the ranks. "
            "Ratios are to plain on the same devices (DDP).")
    return notes


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / "results.jsonl"
    jsonl.write_text("")
    rows, plain = [], None
    for case in args.cases:
        t0 = time.perf_counter()
        row = {"devices": args.devices, **run_case(args, case, plain)}
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
