"""``batch_chunks="auto"``: when the budget is below the peak with every activation offloaded, run the module that
holds the largest layers in batch chunks (``offload/batch_chunks.py``), as few as bring that peak under it.

Why: with every activation offloaded, a step's device peak (the planner's ``floor``) is the working set of its
largest layer: VGG-16 at batch 256 holds conv1_2's input, output and their gradients at once, 8.51 GiB on an H200,
and no plan of keep, offload and recompute can go below it. Chunks of the batch shrink that working set k-fold
(``benchmarks/README.md``: the trunk in 4 chunks met 50% and 70% of plain's peak where the planner alone raised).

Which module: the layer that saves the most in the profiling step (a CNN's first convolutions), and of the modules
above it the outermost ``nn.Sequential`` (its ``forward`` only chains its children) whose every part computes each
sample on its own, so that chunking it changes nothing beyond rounding: convolutions, linear layers, pooling,
element-wise activations, padding, per-sample norms. Refused, and named in the error: BatchNorm (its statistics
would cover a chunk, as ``BatchChunks`` refuses), dropout with ``p > 0`` (its masks would be other draws), and any
other module, whose ``forward`` might mix samples. ``chunk_layers``, if given, is the one module tried.

How many: the fewest of :data:`CHUNK_COUNTS` that the measured peaks say bring the floor under the budget with
room left for one more chunk's working set, else the fewest that bring it under at all. The floor is modelled as
``rest + chunked / k``: the part the chunks shrink and the rest (weights, optimizer state, layers outside the
module). Before any chunked step ``rest = 0`` is the hopeful guess; after one, the two measured floors give both
parts. The room is what the plan keeps and recomputes with: a floor just under the budget leaves it to offload
everything, which on VGG-16 at batch 256 runs at 0.14x plain (``vdnn_all``), while 4 chunks leave 2.3 GiB of a
6.06 GiB budget and ran at 0.75x (``benchmarks/README.md``). Each choice is measured by the next step, which
profiles again with every activation offloaded; a floor still over the budget tries the next count the model
allows, until the counts or the batch run out, and then the planner's ``BudgetTooSmall`` says what was tried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.padding import _ConstantPadNd, _ReflectionPadNd, _ReplicationPadNd
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd

from lightning_vdnn.layers import resolve_module
from lightning_vdnn.offload.batch_chunks import BatchChunks, batchnorm_inside
from lightning_vdnn.offload.trace import LayerProfile, PassRecords
from lightning_vdnn.planning.activation_solver import BudgetTooSmall
from lightning_vdnn.units import format_bytes

#: Chunk counts tried, fewest first: each halves the chunked working set again; past 32 a chunk of a usual batch
#: is a few samples, too few to keep the device busy.
CHUNK_COUNTS = (2, 4, 8, 16, 32)
#: Modules that compute each sample on their own: chunking them is exact up to rounding.
PER_SAMPLE: tuple[type, ...] = (
    _ConvNd, nn.Linear, nn.Bilinear, nn.Identity, _MaxPoolNd, _AvgPoolNd, _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.LayerNorm, nn.GroupNorm, nn.Upsample,
    _ConstantPadNd, _ReflectionPadNd, _ReplicationPadNd, nn.Flatten,
)


def refusal(module: nn.Module, path: str, named: bool = False) -> Optional[str]:
    """Why auto chunking must not split ``module`` (at ``path``), or None when every part of it computes each
    sample on its own. A module the user ``named`` (``chunk_layers``) is theirs to vouch for, except for what
    ``BatchChunks`` itself refuses."""
    bn = batchnorm_inside(module, path)
    if bn is not None:
        return f"{bn}, whose statistics would then cover a chunk, not the batch"
    for name, sub in () if named else module.named_modules():
        where = ".".join(filter(None, (path, name)))
        if isinstance(sub, nn.Sequential):
            continue
        if isinstance(sub, _DropoutNd):
            if sub.p > 0:
                return f"{where} is a {type(sub).__name__}(p={sub.p}), whose masks would be other draws per chunk"
            continue
        if isinstance(sub, nn.Flatten) and sub.start_dim == 0:
            return f"{where} is a Flatten over the batch dimension"
        if not isinstance(sub, PER_SAMPLE):
            return (f"{where} is a {type(sub).__name__}, not known to compute each sample on its own (its forward "
                    "may mix the batch)")
    return None


@dataclass(frozen=True)
class Tried:
    """One profiling step's chunks and the floor it measured."""

    chunks: int
    floor: int


class AutoChunks:
    """Chooses and applies ``batch_chunks="auto"`` (see the module docstring) for the LightningModule ``root``.

    Args:
        root: the module the layer names are relative to (the LightningModule).
        path: ``chunk_layers``, the one module to try; None: found from the profile.
    """

    def __init__(self, root: nn.Module, path: Optional[str] = None) -> None:
        self.root, self.given = root, path
        self.path: Optional[str] = None
        self.refused: list[str] = []  # why each module looked at could not be chunked
        self.tried: list[Tried] = []
        self.batch: Optional[int] = None
        self._chunks: Optional[BatchChunks] = None

    @property
    def chunks(self) -> int:
        """The chunks the module runs in now (1: none applied)."""
        return 1 if self._chunks is None else self._chunks.chunks

    def too_small(self, err: BudgetTooSmall, floor: int, budget: int, records: PassRecords) -> str:
        """The planner found ``budget`` below ``floor`` (``err``) in the step ``records`` profiled: chunk the module
        in more pieces for the next step, which profiles again; returns the line to log.

        Raises:
            BudgetTooSmall: ``err``, saying what auto chunking tried and why nothing fits.
        """
        self.tried.append(Tried(self.chunks, floor))
        if self.path is None and not self.refused:
            self.path = self._find(records.layer_names(), records.layer_profile())
        count = self._next(budget) if self.path is not None else None
        if count is None:
            raise BudgetTooSmall(f"{err} {self.explain(budget)}") from None
        self.close()
        self._chunks = BatchChunks(self.root, self.path, count)
        return (f"lightning_vdnn batch_chunks='auto': memory_budget {format_bytes(budget)} is below the peak with "
                f"every activation offloaded, {format_bytes(floor)}; the next step runs {self.path!r} in {count} "
                "batch chunks and profiles again.")

    def _find(self, names: Sequence[str], layers: Sequence[LayerProfile]) -> Optional[str]:
        """The module to chunk: ``chunk_layers``, else the outermost per-sample ``nn.Sequential`` above the layer
        that saves the most; the batch it takes (from its first layer's input)."""
        saved = [p.saved_bytes for p in layers[1:len(names)]]  # layer 0: before the first layer
        if not saved:
            self.refused.append("the step ran no layers")
            return None
        largest = names[1 + max(range(len(saved)), key=saved.__getitem__)]
        parts = largest.split(".")
        paths = [self.given] if self.given else [".".join(parts[:i]) for i in range(1, len(parts))]
        for path in paths:
            if self.given:
                module = resolve_module(self.root, path, "chunk_layers")
            else:
                module = _submodule(self.root, path)
                if not isinstance(module, nn.Sequential):  # also None: a layer named by its class, not a path
                    continue
            why = refusal(module, path, named=bool(self.given))
            if why is None:
                self.batch = _batch_of(path, names, layers)
                return path
            self.refused.append(f"{path!r}: {why}")
        if not self.refused:
            self.refused.append(f"no nn.Sequential holds {largest!r}, the layer that saves the most")
        return None

    def _next(self, budget: int) -> Optional[int]:
        """The fewest chunks, more than now, that the floors measured so far allow to fit ``budget`` with room for
        one more chunk's working set, else at all; None: none does."""
        counts = [k for k in CHUNK_COUNTS if k > self.chunks and (self.batch is None or k <= self.batch)]
        first = self.tried[0]
        rest = 0.0  # before a chunked step: all of the floor might shrink (then the next step measures it)
        if len(self.tried) > 1:  # two floors: the part the chunks shrink, and the rest
            last = self.tried[-1]
            shrunk = (first.floor - last.floor) / (1 - 1 / last.chunks)
            if shrunk <= 0:
                return None
            rest = first.floor - shrunk
        shrinks = first.floor - rest
        roomy = [k for k in counts if rest + 2 * shrinks / k <= budget]  # room for one more chunk's working set
        fits = [k for k in counts if rest + shrinks / k <= budget]
        return (roomy or fits or [None])[0]

    def explain(self, budget: int) -> str:
        """What auto chunking tried, for the error."""
        if self.path is None:
            return ("batch_chunks='auto' found no module to run in batch chunks without changing the result: "
                    + "; ".join(self.refused) + ". Set batch_chunks and chunk_layers yourself to accept that.")
        runs = ", ".join(f"{t.chunks} chunk{'s' * (t.chunks > 1)}: {format_bytes(t.floor)}" for t in self.tried)
        most = min(CHUNK_COUNTS[-1], self.batch or CHUNK_COUNTS[-1])
        why = ("even if all of it shrank with the chunks" if len(self.tried) == 1 else
               "the rest of the peak is outside that module (weights, optimizer state, other layers)")
        return (f"batch_chunks='auto' would run {self.path!r} in batch chunks (floors measured: {runs}), but no "
                f"count up to {most} is predicted to bring the floor under {format_bytes(budget)}: {why}.")

    def report_fields(self) -> dict:
        """The chunks chosen, for a ``MemoryReport``."""
        if self._chunks is None:
            return {}
        return dict(batch_chunks=self.chunks, chunk_layers=self.path, chunks_auto=True)

    def close(self) -> None:
        """The module's own ``forward`` back."""
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None


def _submodule(root: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _batch_of(path: str, names: Sequence[str], layers: Sequence[LayerProfile]) -> Optional[int]:
    """Dim 0 of the first input of the first layer inside ``path``: the batch it chunks (None: not seen)."""
    for name, layer in zip(names, layers):
        if name.startswith(path + ".") and layer.inputs and layer.inputs[0]:
            return layer.inputs[0][0]
    return None
