"""Turn result rows into what a reader compares: ratios to plain, a markdown table, a memory/speed plot."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional

GiB = 2**30
COLUMNS = ("case", "status", "step s (median)", "{unit}/s", "model TFLOP/s", "peak alloc GiB",
           "peak reserved GiB", "host RSS GiB", "time / plain", "memory / plain")
#: With N devices: throughput and TFLOP/s per device, the total beside them; peaks per device (max over ranks).
COLUMNS_N = ("case", "status", "step s (median)", "{unit}/s per GPU", "{unit}/s total", "model TFLOP/s per GPU",
             "peak alloc GiB (max GPU)", "peak reserved GiB (max GPU)", "host RSS GiB (sum)", "time / plain",
             "memory / plain")


#: The profiled step's table: (header, key in the row's ``profile``); GPU columns are empty off CUDA.
PROFILE_COLUMNS = (("wall ms", "wall_ms"), ("kernels ms", "kernel_ms"), ("H2D ms", "h2d_ms"), ("H2D GB", "h2d_gb"),
                   ("D2H ms", "d2h_ms"), ("D2H GB", "d2h_gb"), ("copy hidden ms", "copy_hidden_ms"),
                   ("copy exposed ms", "copy_exposed_ms"), ("GPU idle ms", "gpu_idle_ms"),
                   ("host sync ms", "sync_ms"), ("host outside ops ms", "host_outside_ops_ms"))
TOP_OPS_SHOWN = 3


def devices_of(rows: list[dict]) -> int:
    """The number of devices the rows were measured on (1 for a one-device run)."""
    return max((r.get("devices") or 1 for r in rows), default=1)


def add_ratios(row: dict, plain: Optional[dict]) -> dict:
    """``time_ratio`` and ``mem_ratio`` (peak allocated) of ``row`` against a measured ``plain`` row."""
    def ratio(key: str) -> Optional[float]:
        ok = plain is not None and plain.get("status") == "ok" and row.get("status") == "ok"
        return row[key] / plain[key] if ok and row.get(key) and plain.get(key) else None

    return {**row, "time_ratio": ratio("step_s"), "mem_ratio": ratio("peak_alloc_bytes")}


def _num(value: Optional[float], fmt: str, scale: float = 1.0) -> str:
    return "" if value is None else format(value / scale, fmt)


def _cells(row: dict, devices: int) -> list[str]:
    total = [_num(row.get("items_per_s_total"), ",.0f")] if devices > 1 else []
    return [row["case"], row["status"].replace("|", "/").splitlines()[0][:120], _num(row.get("step_s"), ".4f"),
            _num(row.get("items_per_s"), ",.0f"), *total, _num(row.get("tflops"), ".1f"),
            _num(row.get("peak_alloc_bytes"), ".2f", GiB), _num(row.get("peak_reserved_bytes"), ".2f", GiB),
            _num(row.get("host_rss_bytes"), ".2f", GiB), _num(row.get("time_ratio"), ".2f"),
            _num(row.get("mem_ratio"), ".2f")]


def header(rows: list[dict], model: str) -> str:
    """Date, device and versions, from the first row that knows them."""
    env = next((r for r in rows if r.get("torch")), {})
    devices = devices_of(rows)
    on = f"{devices} x {env.get('device_name', '?')} (data parallel)" if devices > 1 else env.get("device_name", "?")
    return (f"Model `{model}`, measured {datetime.date.today().isoformat()} on {on} "
            f"(torch {env.get('torch', '?')}, lightning {env.get('lightning', '?')}, "
            f"deepspeed {env.get('deepspeed', '?')}, CUDA {env.get('cuda', 'none')}); "
            f"median of {env.get('steps', '?')} steps after {env.get('warmup', '?')} warm-up.")


def _memory_key(rows: list[dict]) -> tuple[str, str]:
    """Which memory the table sorts by and the plot puts on x: the GPU's peak, or host RSS on a CPU run."""
    if any(r.get("peak_alloc_bytes") for r in rows if r.get("status") == "ok"):
        return "peak_alloc_bytes", "peak GPU memory allocated (GiB)"
    return "host_rss_bytes", "peak host RSS (GiB); no GPU in this run"


def markdown(rows: list[dict], model: str, notes: list[str]) -> str:
    """The results table with ratios to ``plain``, least memory first, so that "at this memory, who is
    fastest" is read off neighbouring rows; cases that did not run at the end, with their status."""
    unit = next((r["unit"] for r in rows if r.get("unit")), "items")
    devices = devices_of(rows)
    cols = [c.format(unit=unit) for c in (COLUMNS_N if devices > 1 else COLUMNS)]
    key = _memory_key(rows)[0]
    ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: r.get(key) or 0)
    ordered = ok + [r for r in rows if r.get("status") != "ok"]
    lines = [header(rows, model), ""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cells(r, devices)) + " |" for r in ordered]
    return "\n".join(lines + phase_table(ordered) + allocator_table(ordered) + profile_table(ordered)) + "\n"


def phase_table(rows: list[dict]) -> list[str]:
    """Lines of a table of the Lightning cases' marks (``StepClock.mark``): per timed step (median), when the
    host had queued forward and backward and when the device had run them (none: no lines)."""
    marked = [r for r in rows if r.get("phases")]
    if not marked:
        return []
    lines = ["", "## Host or device first (Lightning cases, median of the timed steps)", "",
             "From the step's opening sync: ms until the host had queued forward (backward), and until the device "
             "had run it. Device about equal to host: the device waited for the host; longer: the host was ahead.",
             "", "| case | forward host ms | forward device ms | backward host ms | backward device ms |",
             "|---|---|---|---|---|"]
    for r in marked:
        cells = [r["case"]]
        for name in ("forward", "backward"):
            mark = r["phases"].get(name, {})
            cells += [_num(mark.get("host_ms"), ".1f"), _num(mark.get("device_ms"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def allocator_table(rows: list[dict]) -> list[str]:
    """Lines of a table of what the caching allocator did in the timed steps (``measure.allocator_summary``; none
    off CUDA: no lines): the memory a case needs of a GPU once settled, and whether it went to the driver."""
    seen = [r for r in rows if r.get("allocator")]
    if not seen:
        return []
    lines = ["", "## The caching allocator in the timed steps", "",
             "Reserved: what the allocator held after the last timed step, its cache included (what the case needs "
             "of a GPU; the peak reserved above also covers warm-up and the planner's steps). Driver calls in the "
             "timed steps: `cudaMalloc`, `cudaFree` (waits for the device) and retries (a full cache freed to fit).",
             "", "| case | reserved GiB | cudaMalloc | cudaFree | retries |", "|---|---|---|---|---|"]
    for r in seen:
        a = r["allocator"]
        lines.append(f"| {r['case']} | {_num(a.get('reserved_bytes'), '.2f', GiB)} | {a.get('num_device_alloc')} | "
                     f"{a.get('num_device_free')} | {a.get('num_alloc_retries')} |")
    return lines


def _top_ops(profile: dict) -> str:
    ops = profile.get("top_ops") or []
    return "; ".join(f"{op['name'][:48]} {op['self_ms']:.2f} ({op['thread']})"
                     for op in ops[:TOP_OPS_SHOWN]).replace("|", "/")


def _profiled_steps(rows: list[dict]) -> str:
    """Which step each case profiled: one index for all, or each case's (a settled plan's step comes later)."""
    steps = {r.get("profile_step") for r in rows}
    if len(steps) == 1:
        return f"step {steps.pop()}"
    return "steps " + ", ".join(f"{r['case']} {r.get('profile_step')}" for r in rows)


def profile_table(rows: list[dict]) -> list[str]:
    """The lines of the second table, one row per case that has a profile (none: no lines): where the time
    of its one profiled step went (``benchmarks/step_profile.py`` says what each column counts)."""
    profiled = [r for r in rows if r.get("profile")]
    if not profiled:
        return []
    cols = ["case", *(name for name, _ in PROFILE_COLUMNS), f"top {TOP_OPS_SHOWN} host ops, self ms (thread)"]
    lines = ["", "## Where the step's time goes (one profiled step)", "",
             f"One extra step per case under torch.profiler ({_profiled_steps(profiled)}, not in the median "
             "above); on a GPU, copies are host<->device, 'hidden' while a kernel runs, 'exposed' otherwise. "
             "Host sync: time the host waited in CUDA synchronisations, the clock's own closing sync left out.",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    if devices_of(rows) > 1:
        lines.insert(4, "Each rank profiled its own step: rank 0's here, every rank's in results.jsonl (per_rank).")
    if not all(r["profile"].get("all_threads") for r in profiled):
        lines.insert(4, "This torch's profiler recorded the stepping thread only: other threads' host ops are missing.")
    for r in profiled:
        prof = r["profile"]
        cells = [r["case"], *(_num(prof.get(key), ".3f" if "gb" in key else ".2f") for _, key in PROFILE_COLUMNS),
                 _top_ops(prof)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], path: Path, model: str) -> None:
    """Throughput against peak device memory, one labelled point per measured case (host RSS on a CPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    key, xlabel = _memory_key(rows)
    unit = next((r["unit"] for r in rows if r.get("unit")), "items")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in ok:
        if r.get(key) is None:
            continue
        x, y = r[key] / GiB, r["items_per_s"]
        ax.scatter([x], [y], s=30)
        ax.annotate(r["case"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    devices = devices_of(rows)
    per = f" per device, {devices} devices" if devices > 1 else ""
    ax.set(xlabel=xlabel, ylabel=f"{unit}/s{per} (median step)", title=f"{model}: throughput vs memory")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
