"""The data-parallel side of a case: its process group, this rank's device, and one row out of N ranks.

With ``run.py --devices N`` a case runs under ``torchrun --nproc_per_node N``: every rank trains the same
workload on the same per-device batch and measures its own steps and memory. The ranks' rows become one:

- step time: per step, the slowest rank (the ranks wait for each other in every gradient reduction);
  ``items_per_s`` is per device, so that it compares directly with a one-device run; ``items_per_s_total``
  is all devices together;
- device memory: the largest peak over the ranks (what each GPU must hold);
- host RSS: the sum over the ranks (what the host must hold), and ``host_rss_max_rank_bytes``;
- losses: per step, the mean over the ranks (the loss of the global batch, each rank holding an equal share).
  Every rank holds the same batch, so the all-reduced gradient equals one device's and the loss curve is the
  one-device curve.
- profile (``--profile``): rank 0's step summary; every rank's is in ``per_rank``; so are the marks (``phases``).
"""

from __future__ import annotations

import os
import socket
import statistics
from typing import Optional

import torch


def local_device(kind: str) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (index spelled out: ``torch.cuda.set_device`` needs one)."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if kind == "cuda" else torch.device(kind)


def world_size() -> int:
    """Ranks in the process group; 1 with none."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_group(device: torch.device) -> None:
    """The default process group: the ``torchrun`` ranks, or this process alone (ZeRO and FSDP2 need a group
    even on one device) on a free local port. nccl on CUDA, gloo on a CPU."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:  # not under torchrun
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def launch_error(devices: int) -> Optional[str]:
    """Why this process cannot be one of ``devices`` ranks, or None."""
    found = int(os.environ.get("WORLD_SIZE", 1))
    if devices > 1 and found != devices:
        return (f"error: --devices {devices} needs {devices} processes, found WORLD_SIZE={found}. Start it as "
                f"'torchrun --standalone --nproc_per_node {devices} -m benchmarks.case ...' (run.py does).")
    return None


def gather(row: dict) -> Optional[dict]:
    """Every rank's row to every rank; the merged row on rank 0, None on the others."""
    import torch.distributed as dist

    rows: list = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    return merge(rows) if dist.get_rank() == 0 else None


def finish() -> None:
    """Wait for every rank, then end the group: called after rank 0 printed its row, so that nothing the
    others print on their way out lands inside that line."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _largest(rows: list[dict], key: str) -> Optional[int]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


def merge(rows: list[dict]) -> dict:
    """One row for the case from every rank's (all ``ok``): see the module's docstring for each number."""
    from benchmarks.measure import summarize

    first, n = rows[0], len(rows)
    times = [max(step) for step in zip(*(r["step_s_all"] for r in rows))]
    merged = {**first, **summarize(times, first["warmup"], first["items_per_step"], first["flops_per_step"],
                                   first.get("profile_step"))}
    merged.update(
        devices=n, items_per_s_total=merged["items_per_s"] * n,
        losses=[statistics.fmean(step) for step in zip(*(r["losses"] for r in rows))],
        peak_alloc_bytes=_largest(rows, "peak_alloc_bytes"), peak_reserved_bytes=_largest(rows, "peak_reserved_bytes"),
        host_rss_bytes=sum(r["host_rss_bytes"] for r in rows), host_rss_max_rank_bytes=_largest(rows, "host_rss_bytes"),
        per_rank=[{k: r.get(k) for k in ("step_s", "peak_alloc_bytes", "peak_reserved_bytes", "host_rss_bytes",
                                          "memory_report", "profile", "phases")} for r in rows],
    )
    return merged
