"""Will the host hold what layer streaming keeps there? Checked before any buffer is pinned.

L2L moves the blocks' weights, gradients and optimizer state into host memory. If the host cannot hold
them, the kernel's OOM killer ends the run some steps later with no message at all (pinned pages cannot
be swapped out), so the estimate is compared with the memory available, to the host or to the cgroup of
a container, whichever is less, and a run that cannot fit fails at setup, stating the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import psutil
from torch import Tensor, nn
from torch.optim import Optimizer

#: Optimizer state per parameter element, in parameters' worth: Adam-like optimizers keep two moments.
ADAM_STATES = 2
#: Where cgroup v2 (``memory.max``) or v1 (``memory/memory.limit_in_bytes``) files live.
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class HostNeed:
    """Host bytes layer streaming keeps: the blocks' weights, gradients, optimizer state, and staging buffers.

    ``resident`` is the part the weights already occupy in host memory (a model built on the CPU), which
    the memory available no longer counts and which streaming reuses.
    """

    weights: int
    grads: int
    optimizer: int
    staging: int
    resident: int = 0
    copies: int = 0  # the weights in the slots' narrower dtype, written by the host update (``host_update.py``)

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.staging + self.copies

    @property
    def new(self) -> int:
        """Bytes still to be taken from the memory available."""
        return self.total - self.resident


def required_host_bytes(blocks: Iterable[nn.Module], optimizer_states: float = ADAM_STATES, shards: int = 1,
                        copy_ratio: float = 0.0, grad_ratio: float = 1.0) -> HostNeed:
    """What streaming ``blocks`` holds in host memory: per block one flat weight buffer and one gradient buffer,
    ``optimizer_states`` parameters' worth of optimizer state (2 for Adam, 1 for SGD with momentum), and two
    gradient staging buffers the size of the largest block. With the host state partitioned over ``shards``
    ranks (``streaming/sharded.py``), each rank holds all the weights but 1/``shards`` of the rest. ``copy_ratio``:
    bytes of the compute-dtype copy per weight byte (0.5 for bf16 slots over fp32 weights, 0 without one);
    ``grad_ratio``: bytes of a host gradient (and its staging) per weight byte (0.5 for bf16 gradients of fp32
    weights, ``streaming/bf16_grads.py``). A frozen parameter (``requires_grad=False``) has no gradient and no
    optimizer state on one rank (``HostBlock``); partitioned, its gradient range is kept (and zero)."""
    weights = trained = resident = largest = 0
    for block in blocks:
        nbytes = sum(p.numel() * p.element_size() for p in block.parameters())
        learns = sum(p.numel() * p.element_size() for p in block.parameters() if p.requires_grad)
        weights += nbytes
        trained += learns
        largest = max(largest, nbytes if shards > 1 else learns)
        resident += sum(p.numel() * p.element_size() for p in block.parameters() if p.device.type == "cpu")
    graded = -(-(weights if shards > 1 else trained) // shards)
    stepped = -(-trained // shards)
    return HostNeed(weights=weights, grads=int(grad_ratio * graded), optimizer=int(optimizer_states * stepped),
                    staging=int(grad_ratio * 2 * -(-largest // shards)), resident=resident,
                    copies=int(copy_ratio * weights))


def held_host_bytes(blocks: Iterable[Any], staging: Iterable[Tensor], optimizers: Iterable[Optimizer]) -> int:
    """Host bytes the streamed blocks' state holds now: weights, gradients, compute-dtype copies (``HostBlock``),
    the gradient ``staging`` buffers, and the optimizers' per-element state of the blocks' parameters."""
    from lightning_vdnn.streaming.host_state import optimizer_state_bytes

    blocks = list(blocks)
    held = sum(t.nbytes for b in blocks for t in (b.flat, b.grad_flat, b.copy) if t is not None)
    held += sum(t.nbytes for t in staging)
    return held + optimizer_state_bytes(optimizers, [p for b in blocks for p in b.params])


def available_host_bytes() -> tuple[int, str]:
    """Host memory a new allocation can get, and where the number comes from (the host or its cgroup)."""
    host = psutil.virtual_memory().available
    cgroup = cgroup_available_bytes()
    if cgroup is not None and cgroup < host:
        return cgroup, "the container's cgroup memory limit"
    return host, "the host"


def cgroup_available_bytes(root: Optional[Path] = None) -> Optional[int]:
    """The cgroup's limit less its usage (page cache it can drop not counted), or None without a limit."""
    root = CGROUP_ROOT if root is None else root
    for limit_file, usage_file, cache_key in (("memory.max", "memory.current", "inactive_file"),
                                              ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                               "total_inactive_file")):
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text())
            stat = (root / limit_file).with_name("memory.stat").read_text().split("\n")
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as a page-rounded 2**63 - 1
            return None
        cache = next((int(line.split()[1]) for line in stat if line.startswith(cache_key + " ")), 0)
        return max(int(limit) - (usage - cache), 0)
    return None


def check_host_memory(blocks: Iterable[nn.Module], where: str, optimizer_states: float = ADAM_STATES,
                      shards: int = 1, processes: int = 1, copy_ratio: float = 0.0,
                      grad_ratio: float = 1.0) -> HostNeed:
    """Raise ``MemoryError`` if the host cannot hold what streaming ``blocks`` needs; else return the estimate.

    Args:
        blocks: the blocks to stream (their parameters, wherever they are now).
        where: names the blocks in the message, e.g. ``"the 24 blocks at 'model.blocks'"``.
        optimizer_states: parameters' worth of optimizer state per parameter (Adam: 2).
        shards: ranks the gradients and optimizer state are partitioned over (1: none).
        processes: processes on this host streaming alike (a node's local ranks), each needing as much: each
            one checks that all of them fit, since they pin their buffers at about the same time.
        copy_ratio, grad_ratio: as in :func:`required_host_bytes`.
    """
    need = required_host_bytes(blocks, optimizer_states, shards, copy_ratio, grad_ratio)
    available, source = available_host_bytes()
    if need.new * processes > available:
        over = f" / {shards} ranks" if shards > 1 else ""
        each = f", for each of the {processes} processes on this host," if processes > 1 else ""
        raise MemoryError(
            f"layer streaming of {where} needs{each} {_size(need.total)} of host memory (weights {_size(need.weights)} + "
            f"gradients {_size(need.grads)} + optimizer state {_size(need.optimizer)}, estimated at "
            f"{optimizer_states:g}x the weights{over}, + staging {_size(need.staging)}"
            + (f" + the weights' compute-dtype copy {_size(need.copies)}" if need.copies else "") + "), "
            f"{_size(need.new)} more than "
            f"the weights already hold, but {source} has {_size(available)} available. Use a smaller model or fewer "
            "blocks, free host memory, or run on a host with more RAM."
        )
    return need


def _size(nbytes: int) -> str:
    """GiB with two decimals, or MiB below a quarter GiB (a small model's numbers would all read 0.00 GiB)."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.1f} MiB"
