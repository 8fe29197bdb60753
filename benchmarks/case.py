"""Run ONE case in this process and print its result as one JSON line.

The runner starts this as ``python -m benchmarks.case`` in a fresh process per case, so that every case
starts from empty device memory, its peak is its own, and a crash (or a hang, or a host OOM kill) takes
only this case down. Whatever happens, the last line of stdout starting with ``MARKER`` is the result.

With ``--profile`` one extra step runs under ``torch.profiler`` (``benchmarks/step_profile.py``), the last by
default, left out of the median; its summary is the row's ``profile``.

With ``--devices N`` it is one of N ranks under ``torchrun`` (``benchmarks/parallel.py``): rank 0 prints the
row merged from every rank's. A rank whose case fails prints its own row and ends the job at once: its peers
may be waiting for it inside a collective, and torchrun stops them when one rank exits with an error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from benchmarks.measure import ProfileRequest

MARKER = "BENCH_RESULT "


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--case", required=True, help="a case name from benchmarks.registry, e.g. 'vdnn@50%%'")
    p.add_argument("--model", required=True, help="a key of benchmarks.workloads.SIZES")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--devices", type=int, default=1, help="data-parallel ranks; >1 needs torchrun with as many")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--settle", type=int, default=0,
                   help="Lightning cases: up to this many extra steps, so that the steps the planner measures "
                        "(VDNNStrategy.planning) stay out of the median, and a profiled step comes after them "
                        "(0: off; not with --profile-step)")
    p.add_argument("--memory-budget", type=int, default=None, help="bytes, for the @P%% cases")
    p.add_argument("--compile", action="store_true", help="compile the model's blocks (workloads.compiled)")
    p.add_argument("--device-gib", type=float, default=None,
                   help="cap this process's device memory at this many GiB, as on a smaller GPU (measure.py)")
    p.add_argument("--inject-crash", action="store_true", help="die at once, as a crash would (tests)")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="seconds: Python's GIL switch interval for the run (sys.setswitchinterval; default 0.005), "
                        "the longest a worker thread waits to win the GIL back from the thread driving the GPU")
    p.add_argument("--profile", action="store_true",
                   help="run one extra step under torch.profiler (not timed); its summary is the row's 'profile'")
    p.add_argument("--profile-step", type=int, default=None,
                   help="which step to profile, 0-based over warm-up + timed + 1 (default: the last); "
                        "implies --profile")
    p.add_argument("--trace-dir", type=Path, default=None,
                   help="write the profiled step's Chrome trace here, one file per case (and rank); "
                        "implies --profile")
    args = p.parse_args(argv)
    args.profile = args.profile or args.profile_step is not None or args.trace_dir is not None
    if args.settle < 0:
        p.error(f"--settle {args.settle}: give a number of extra steps, 0 or more.")
    if args.switch_interval is not None and args.switch_interval <= 0:
        p.error(f"--switch-interval {args.switch_interval}: give a number of seconds above 0, e.g. 0.0005.")
    if args.profile_step is not None:
        args.settle = 0  # the profiled step's index is fixed before the run
    if args.profile:
        from benchmarks.step_profile import profiled_step

        try:
            args.profile_step = profiled_step(args.warmup, args.steps, args.profile_step)
        except ValueError as exc:
            p.error(str(exc))
    return args


def trace_path(trace_dir: Path, case: str, devices: int) -> Path:
    """The Chrome trace's file for ``case``: its name made safe for a file name, and this rank's number."""
    stem = re.sub(r"[^\w.-]+", "_", case.replace("@", "_at_").replace("%", "pct"))
    rank = f".rank{os.environ.get('RANK', 0)}" if devices > 1 else ""
    return trace_dir / f"{stem}{rank}.json"


def _profile_request(args: argparse.Namespace) -> Optional[ProfileRequest]:
    """What the case's clock profiles: None without ``--profile``."""
    from benchmarks.measure import ProfileRequest

    if not args.profile:
        return None
    trace = trace_path(args.trace_dir, args.case, args.devices) if args.trace_dir else None
    return ProfileRequest(args.profile_step, trace)


def _run(args: argparse.Namespace, row: dict, device) -> None:
    """Build the workload, run the case, fill ``row`` with its numbers."""
    from benchmarks.measure import allocator_summary, phase_medians, profiling, settled_warmup, summarize
    from benchmarks.registry import devices_status, split_case
    from benchmarks.workloads import build, chunked_loss, compiled, repeated

    spec, _ = split_case(args.case)
    refusal = devices_status(spec, args.devices)
    if refusal:
        raise NotImplementedError(refusal.removeprefix("n/a: "))
    w = repeated(build(args.model, device), spec.accumulate)
    if spec.loss_chunks:
        w = chunked_loss(w, spec.loss_chunks)
    if args.compile:
        w = compiled(w)
    request = _profile_request(args)
    n = args.warmup + args.steps + (request is not None)
    row.update(unit=w.unit, items_per_step=w.items_per_step, flops_per_step=w.flops_per_step)
    with profiling(request):
        if spec.kind == "peer":
            from benchmarks.peers import run_peer

            clock, extra = run_peer(spec.name, w, device, n), {}
        else:
            from benchmarks.lightning_cases import run_lightning

            settle = (args.warmup, args.steps, args.settle) if args.settle else None
            clock, extra = run_lightning(spec.name, w, device, n, args.memory_budget, args.devices, settle)
    if request is not None and clock.profile is None:
        if args.settle and spec.kind != "peer":
            raise RuntimeError(f"no step of a settled plan was profiled: the planner still measured steps after "
                               f"{len(clock.times)} steps; raise --settle (now {args.settle}).")
        raise RuntimeError(f"step {request.step} was to be profiled, but the case ran {len(clock.times)} steps.")
    warmup = settled_warmup(clock.planning, args.warmup) if args.settle else args.warmup
    if warmup >= len(clock.times):  # the planner measured every step: time the usual ones, and say so
        row["unsettled"], warmup = True, args.warmup
    profiled = clock.profiled_at if clock.profiled_at is not None else args.profile_step
    row.update(summarize(clock.times, warmup, w.items_per_step, w.flops_per_step, profiled),
               losses=clock.losses, warmup_steps=warmup, planning_steps=sum(clock.planning), **extra)
    if clock.phases and any(clock.phases):
        row["phases"] = phase_medians(clock.phases, warmup, profiled)
    if clock.allocator:
        row["allocator_per_step"] = clock.allocator
        row["allocator"] = allocator_summary(clock.allocator, warmup, profiled)
    if request is not None:
        row["profile"], row["profile_step"] = clock.profile, profiled
    row["status"] = "ok"


def _status(exc: BaseException) -> str:
    """What the table shows for a case that raised."""
    import torch

    text = f"{type(exc).__name__}: {exc}".strip()
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "OOM"
    if isinstance(exc, NotImplementedError):
        return f"n/a: {exc}"
    return f"error: {text.splitlines()[0][:300]}"


def _unrunnable(args: argparse.Namespace, device) -> Optional[str]:
    """Why this machine or launch cannot run the case at all, or None."""
    import torch

    from benchmarks.parallel import launch_error

    if device.type == "cuda" and not torch.cuda.is_available():
        return "skipped: no CUDA device here (--tiny runs on a CPU)"
    if device.type == "cuda" and torch.cuda.device_count() < args.devices:
        return f"skipped: --devices {args.devices} needs as many GPUs; this machine has {torch.cuda.device_count()}"
    return launch_error(args.devices)


def _print(row: dict) -> None:
    print(MARKER + json.dumps(row), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.inject_crash:
        print(f"{args.case}: crashing on purpose (--inject-crash)", file=sys.stderr, flush=True)
        os._exit(70)
    import torch

    from benchmarks import parallel
    from benchmarks.measure import cap_device_memory, environment, memory_stats

    device = parallel.local_device(args.device)
    why = _unrunnable(args, device)
    if why:
        _print({"case": args.case, "status": why, "devices": args.devices})
        return 0
    if device.type == "cpu":
        torch.set_num_threads(1)  # a smoke run: one thread does not stall behind other processes' threads
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    row = {"case": args.case, "model": args.model, "status": "error: did not finish", "devices": args.devices,
           "steps": args.steps, "warmup": args.warmup, "memory_budget": args.memory_budget, "compiled": args.compile,
           "profile_step": args.profile_step, "device_gib": args.device_gib,
           "switch_interval": sys.getswitchinterval(), **environment(device)}
    if args.devices > 1:
        parallel.init_group(device)
    try:
        cap_device_memory(device, args.device_gib)
        _run(args, row, device)
    except Exception as exc:  # noqa: BLE001 - a case's failure is a result, not a crash of the suite
        row["status"] = _status(exc)
        row["traceback"] = traceback.format_exc()[-4000:]
        traceback.print_exc()
        if args.devices > 1:  # see the module's docstring; os._exit: no exit handler may wait on the peers
            _print({**row, **memory_stats(device), "failed_rank": int(os.environ.get("RANK", 0))})
            sys.stderr.flush()
            os._exit(1)
    row.update(memory_stats(device))
    if args.devices > 1:
        row = parallel.gather(row)
    if row is not None:
        _print(row)
    if args.devices > 1:
        parallel.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
