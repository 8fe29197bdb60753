"""The end of ``fit``: the per-layer table printed and the plot of one step saved, from a :class:`MemoryReport`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from lightning_vdnn.report.memory_report import LayerStats, MemoryReport, _kept
from lightning_vdnn.units import UNBOUNDED, GiB, format_bytes

if TYPE_CHECKING:
    from rich.table import Table

#: Title of the table printed at the end of ``fit``.
TABLE_TITLE = "vDNN memory report"
#: File name of the plot saved at the end of ``fit``, in the logger's log directory (or ``report_dir``).
TIMELINE_FILE = "vdnn_memory_timeline.png"


# -- the end of fit: a table and a plot -----------------------------------------------------------------------
def layer_table(report: MemoryReport, top: int = 10) -> "Table":
    """A ``rich`` table: the ``top`` layers by saved bytes, the rest summed, totals, predicted vs measured peak;
    a column of recompute times when the plan recomputes layers."""
    from rich.table import Table

    rows = sorted((r for r in report.layers if r.saved_bytes or r.decision == "recompute"),
                  key=lambda r: r.saved_bytes, reverse=True)
    timed = any(r.forward_ms is not None for r in report.layers)
    redone = any(r.recompute_ms is not None for r in report.layers)
    table = Table(title=f"{TABLE_TITLE} (policy={report.policy}): activations saved for backward",
                  caption=_peak_caption(report), caption_justify="left")
    columns = (("layer", "left", True), ("saved", "right", True), ("decision", "left", True),
               ("forward ms", "right", timed), ("recompute ms", "right", redone))
    for name, justify, shown in columns:
        if shown:
            table.add_column(name, justify=justify)

    def add(name: str, saved: int, decision: str, group: Sequence[LayerStats]) -> None:
        cells = [name, format_bytes(saved), decision]
        for shown, ms in ((timed, [r.forward_ms for r in group]), (redone, [r.recompute_ms for r in group])):
            ms = [t for t in ms if t is not None]
            cells += [f"{sum(ms):.2f}" if ms else ""] if shown else []
        table.add_row(*cells)

    for r in rows[:top]:
        add(r.name, r.saved_bytes, r.described, [r])
    rest = rows[top:]
    if rest:
        add(f"... {len(rest)} more layers", sum(r.saved_bytes for r in rest), _decisions(rest), rest)
    table.add_section()
    add(f"total ({len(report.layers)} layers)", report.kept_bytes + report.offloaded_bytes, _decisions(rows),
        report.layers)
    return table


def _decisions(rows: Sequence[LayerStats]) -> str:
    """``"3 keep, 5 offload"``, and ``", 2 recompute"`` (``" (1 selective)"``) when there are any."""
    count = {d: sum(r.decision == d for r in rows) for d in ("keep", "offload", "recompute")}
    selective = sum(r.selective for r in rows)
    return f"{count['keep']} keep, {count['offload']} offload" + (
        f", {count['recompute']} recompute" if count["recompute"] else "") + (
        f" ({selective} selective)" if selective else "")


def _peak_caption(report: MemoryReport) -> str:
    opt = lambda v: "n/a" if v is None else format_bytes(v)  # noqa: E731
    moved = (f"kept on the device {format_bytes(report.kept_bytes)}, offloaded to the host "
             f"{format_bytes(report.offloaded_bytes)}" + (
                 f", {report.recomputed_forwards} layers recomputed in backward ({report.recompute_ms:.1f} ms)"
                 if report.recomputed_forwards else "") + "\n")
    if report.budget_bytes is None:
        return moved + "peak device memory: " + ("not measured on a CPU device" if report.peak_device_bytes is None
                                                 else format_bytes(report.peak_device_bytes)) + _chunks(report)
    budget = "none (CPU)" if report.budget_bytes >= UNBOUNDED else format_bytes(report.budget_bytes)
    where = " (CPU: activations kept in place)" if report.peak_device_bytes is None else ""
    return (moved + f"peak{where}: predicted {opt(report.predicted_peak_bytes)}, measured "
            f"{opt(report.measured_peak_bytes)}{_kept(report)}; budget {budget}"
            + (f"; {report.segments} recomputed segments" if report.segments else "") + _chunks(report))


def _chunks(report: MemoryReport) -> str:
    return f"\nbatch chunks: {report.chunks_line()}" if report.batch_chunks is not None else ""


def save_timeline(report: MemoryReport, path: "str | Path") -> str:
    """A PNG of memory through one step, written to ``path`` (local, or any fsspec URL) through fsspec, as
    Lightning's loggers and checkpoints are: on a GPU, ``torch.cuda.memory_allocated()`` sampled at each layer
    boundary of forward and each unpack of backward (``report.timeline``); on a CPU, where there is nothing to
    sample, the bytes saved for backward that stay in place and that move to the host, counted per layer as
    forward adds them and backward frees them. The title says which."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if report.timeline:
        _plot_sampled(ax, report)
    else:
        _plot_counted(ax, report)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    from lightning.fabric.utilities.cloud_io import get_filesystem

    path = os.fspath(path)
    fs = get_filesystem(path)
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with fs.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return path


def _unit(largest: float) -> tuple[str, int]:
    return next(((u, s) for u, s in (("GiB", GiB), ("MiB", 2**20)) if largest >= s), ("KiB", 2**10))


def _plan_lines(ax: object, report: MemoryReport, scale: int) -> None:
    lines = (("budget", report.budget_bytes, "tab:red", "--"), ("predicted peak", report.predicted_peak_bytes,
             "tab:purple", ":"), ("measured peak", report.measured_peak_bytes, "black", "-."))
    for label, value, color, style in lines:
        if value is not None and value < UNBOUNDED:
            ax.axhline(value / scale, color=color, linestyle=style, linewidth=1, label=label)


def _plot_sampled(ax: object, report: MemoryReport) -> None:
    samples = report.timeline
    unit, scale = _unit(max(s.allocated_bytes for s in samples))
    ax.plot(range(len(samples)), [s.allocated_bytes / scale for s in samples], color="tab:blue",
            label="allocated")
    first_bwd = next((i for i, s in enumerate(samples) if s.phase == "backward"), None)
    if first_bwd is not None:
        ax.axvspan(first_bwd - 0.5, len(samples) - 0.5, color="0.93", label="backward")
    _plan_lines(ax, report, scale)
    ax.set_title(f"Device memory over one step (policy={report.policy})\ntorch.cuda.memory_allocated() sampled "
                 "as each layer's forward begins, then at each unpack in backward", fontsize="medium")
    ax.set_xlabel("sample (forward: layer boundaries; backward: saved tensors brought back)")
    ax.set_ylabel(unit)


def _plot_counted(ax: object, report: MemoryReport) -> None:
    rows = report.layers
    kept, moved, k, m = [], [], 0, 0
    for r in rows:
        k, m = k + r.kept_bytes, m + r.offloaded_bytes
        kept.append(k)
        moved.append(m)
    kept += kept[-2::-1] + [0]  # backward walks back, freeing each layer's saved tensors
    moved += moved[-2::-1] + [0]
    unit, scale = _unit(max(k + m for k, m in zip(kept, moved)) or 1)
    x = range(len(kept))
    ax.fill_between(x, [v / scale for v in kept], step="mid", color="tab:blue", alpha=0.8,
                    label="kept on the device")
    ax.fill_between(x, [v / scale for v in kept], [(a + b) / scale for a, b in zip(kept, moved)], step="mid",
                    color="tab:orange", alpha=0.6, label="offloaded to the host")
    ax.axvspan(len(rows) - 0.5, len(kept) - 0.5, color="0.93", zorder=0, label="backward")
    _plan_lines(ax, report, scale)
    ax.set_title(f"Activations saved for backward over one step, per layer (policy={report.policy})\nCPU run: bytes "
                 "counted by the offload hooks, not sampled device memory", fontsize="medium")
    if len(rows) <= 24:
        ax.set_xticks(range(len(kept)), [r.name for r in rows] + [f"bwd {r.name}" for r in reversed(rows)],
                      rotation=90, fontsize="x-small")
    ax.set_xlabel("forward, layer by layer, then backward")
    ax.set_ylabel(unit)


def print_report(report: MemoryReport, directory: "str | Path | None", top: int = 10) -> Optional[str]:
    """Print :func:`layer_table` to the console and save :func:`save_timeline` in ``directory`` (a path or an
    fsspec URL; ``None``: no file, and a line saying how to get one). Returns the PNG's path, if any."""
    from rich.console import Console

    console = Console()
    console.print(layer_table(report, top))
    if directory is None:
        console.print("memory over one step: not saved (no logger to put it beside); report_dir=... saves it")
        return None
    path = save_timeline(report, os.path.join(os.fspath(directory), TIMELINE_FILE))
    console.print(f"memory over one step: {path}")
    return path
