"""Soak: many steps of each strategy, memory sampled as they go. Does anything grow step after step?

    python benchmarks/soak.py --model gpt_1b --steps 1000 --every 50 --out soak_out    # a GPU
    python benchmarks/soak.py --tiny --steps 20 --every 5 --out /tmp/soak               # CPU, seconds

A leak that a ten-step benchmark cannot see (a pinned buffer per step, a reference kept to each step's
graph, optimizer state that keeps moving) shows here as device memory or host RSS that grows with the step.
Each strategy trains the suite's model (``workloads.py``) through Lightning's ``Trainer``, in this process,
one after the other; every ``--every`` steps a callback records device memory allocated and reserved, host
RSS, the activation pool's host bytes and the loss. Writes ``soak.json`` (every sample and a summary per
metric) and ``soak.md`` (the summary table) into ``--out``, and prints the table.

A metric is flat when its last sample is within ``--tolerance`` of its first (samples start after the first
``--every`` steps, so one-time allocations of the first steps are not counted as growth).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.registry import SIZES, TINY  # noqa: E402

METRICS = ("device_allocated_bytes", "device_reserved_bytes", "host_rss_bytes", "host_pool_bytes")
MiB = 2**20


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt_1b", choices=[n for n, s in SIZES.items() if s.family == "gpt"])
    p.add_argument("--strategies", default="l2l,vdnn_all", help="comma-separated registered names")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per strategy (default 1000)")
    p.add_argument("--every", type=int, default=50, help="sample memory every K steps (default 50)")
    p.add_argument("--tolerance", type=float, default=32.0, help="MiB of growth still called flat (default 32)")
    p.add_argument("--min-offload-bytes", type=int, default=None,
                   help="passed to the vDNN strategies (default theirs, 1 MiB; 0 with --tiny, so they move something)")
    p.add_argument("--tiny", action="store_true", help="the tiny size of --model, on the CPU, fp32")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    args = p.parse_args(argv)
    if args.every < 1 or args.steps < 2 * args.every:
        p.error(f"--steps={args.steps} --every={args.every}: need every >= 1 and at least two samples "
                "(steps >= 2 * every) to compare first and last.")
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    args.model = TINY[args.model] if args.tiny else args.model
    args.device = "cpu" if args.tiny else "cuda"
    if args.min_offload_bytes is None and args.tiny:
        args.min_offload_bytes = 0
    return args


def sampler(device, every: int):
    """A Callback recording memory and loss every ``every`` optimizer steps, from step ``every`` on."""
    import lightning as L
    import psutil
    import torch

    process = psutil.Process()

    class MemorySampler(L.Callback):
        def __init__(self) -> None:
            self.samples: list[dict] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step % every or (self.samples and self.samples[-1]["step"] == step):
                return
            cuda = device.type == "cuda"
            report = trainer.strategy.memory_report() if hasattr(trainer.strategy, "memory_report") else None
            self.samples.append({
                "step": step,
                "loss": float(outputs["loss"]),
                "device_allocated_bytes": torch.cuda.memory_allocated(device) if cuda else None,
                "device_reserved_bytes": torch.cuda.memory_reserved(device) if cuda else None,
                "host_rss_bytes": process.memory_info().rss,
                "host_pool_bytes": report.host_pool_bytes if report is not None else 0,
                # what the strategy moved in the last step: constant when the run is in its steady state
                "offloaded_bytes": report.offloaded_bytes if report is not None else 0,
                "streamed_h2d_bytes": (report.streamed_h2d_bytes or 0) if report is not None else 0,
            })

    return MemorySampler()


def strategy(name: str, min_offload_bytes: Optional[int]):
    """The registered strategy ``name``, with ``min_offload_bytes`` if given."""
    from lightning.pytorch.strategies import StrategyRegistry

    from benchmarks.lightning_cases import strategy_for

    strategy_for(name, None)  # an unknown name raises, naming the registered ones
    if min_offload_bytes is None:
        return name
    entry = StrategyRegistry[name]
    return entry["strategy"](**{**entry["init_params"], "min_offload_bytes": min_offload_bytes})


def soak(name: str, model: str, device, steps: int, every: int, min_offload_bytes: Optional[int] = None) -> list[dict]:
    """Train ``model`` with strategy ``name`` for ``steps`` steps; the memory samples."""
    import lightning as L
    import torch

    from benchmarks.lightning_cases import RepeatBatch, _module
    from benchmarks.workloads import build

    w = build(model, device)
    probe = sampler(device, every)
    trainer = L.Trainer(
        strategy=strategy(name, min_offload_bytes), accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true", max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
    )
    trainer.fit(_module(w, device), train_dataloaders=RepeatBatch(w.batch, steps))
    del trainer, w
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return probe.samples


def summarize(samples: list[dict], tolerance_bytes: float) -> dict:
    """Per metric: first and last sample, growth (last - first), max growth (max - first), and flat or not."""
    out: dict = {"finite_loss": all(math.isfinite(s["loss"]) for s in samples)}
    for metric in METRICS:
        values = [s[metric] for s in samples]
        if any(v is None for v in values):
            out[metric] = None  # not measurable here (device memory on a CPU)
            continue
        first, last = values[0], values[-1]
        out[metric] = {"first": first, "last": last, "growth": last - first, "max_growth": max(values) - first,
                       "flat": last - first <= tolerance_bytes}
    out["flat"] = all(m is None or m["flat"] for m in (out[k] for k in METRICS))
    return out


def table(runs: dict, tolerance_mib: float) -> str:
    """The summary as markdown: one row per strategy and metric, in MiB."""
    lines = [f"Memory over the run (MiB; flat = last within {tolerance_mib:g} MiB of first)", "",
             "| strategy | metric | first | last | growth | max growth | flat |", "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        for metric in METRICS:
            m = run["summary"][metric]
            if m is None:
                lines.append(f"| {name} | {metric} | n/a | n/a | n/a | n/a | n/a |")
                continue
            cells = " | ".join(f"{m[k] / MiB:.1f}" for k in ("first", "last", "growth", "max_growth"))
            lines.append(f"| {name} | {metric} | {cells} | {'yes' if m['flat'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device(args.device)
    runs = {}
    for name in args.strategies:
        samples = soak(name, args.model, device, args.steps, args.every, args.min_offload_bytes)
        runs[name] = {"samples": samples, "summary": summarize(samples, args.tolerance * MiB)}
    result = {"model": args.model, "device": str(device), "steps": args.steps, "every": args.every,
              "tolerance_bytes": int(args.tolerance * MiB), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    md = table(runs, args.tolerance)
    (args.out / "soak.md").write_text(md)
    print(md)
    return 0 if all(r["summary"]["flat"] and r["summary"]["finite_loss"] for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
