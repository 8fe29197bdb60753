"""One typed, frozen configuration object, validated once and read by every other module.

The strategy, the offloader, the planner and the Hydra schema all take a :class:`VDNNConfig`; nothing else
parses user input. Every check says which value was wrong and what would be right.
"""

from __future__ import annotations

import os
import re
import functools
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from lightning_vdnn import config_rules
from lightning_vdnn.layers import LayerPaths
from lightning_vdnn.units import MemoryBudget, MemorySpec, parse_memory_budget  # noqa: F401  (read from here)

Policy = Literal["none", "all", "conv", "auto"]
POLICIES: tuple[str, ...] = typing.get_args(Policy)
ZeroStage = Literal[0, 1, 2, 3]
ZERO_STAGES: tuple[int, ...] = typing.get_args(ZeroStage)
#: ``host_optimizer`` and ``host_state_dtype`` (layer streaming's host update, ``streaming/host_update.py``).
HostBackend = Literal["auto", "torch", "deepspeed", "native"]
HOST_BACKENDS: tuple[str, ...] = typing.get_args(HostBackend)
HostStateDtype = Literal["fp32", "bf16"]
HOST_STATE_DTYPES: tuple[str, ...] = typing.get_args(HostStateDtype)

_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")

#: ``resident_blocks``: a number of blocks, ``"auto"`` (chosen from ``memory_budget``), or None (see VDNNConfig).
ResidentSpec = Union[int, Literal["auto"], None]
SavedSpec = Union[int, Literal["auto"], None]
#: ``batch_chunks``: a number of dim-0 chunks (1: the batch whole), or ``"auto"`` (chosen when the budget needs it).
ChunksSpec = Union[int, Literal["auto"]]
#: ``compiled_activation_budget``: torch's partitioner budget in [0, 1], ``"auto"`` (lowered from the plan), or None.
CompiledBudgetSpec = Union[float, Literal["auto"], None]
#: ``report_dir``: a local path or any fsspec URL (``"s3://bucket/run"``), or None (the logger's log directory).
ReportDir = Union[str, Path, None]


def option(default: Any, scope: str, *, ge: Optional[int] = None, why: str = "", what: str = "understood") -> Any:
    """A field of :class:`VDNNConfig`: its default; ``scope``, which entry points take it
    (``integrations/options.py``: ``"offload"``, ``"streaming"``, ``"chunks"``, ``"zero"``, ``"report"``, or
    ``"common"`` to both engines); ``ge``, its lower bound; ``why``, what a bound, ``None`` or a choice means;
    ``what``, for a ``Literal`` field, what a value outside it is not (``"x='y' is not a policy"``)."""
    return field(default=default, metadata={"scope": scope, "ge": ge, "why": why, "what": what})


@functools.lru_cache(maxsize=None)
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(VDNNConfig)


def _check_choice(name: str, value: Any, choices: tuple, what: str, why: str) -> None:
    """A ``Literal`` field: the value's type, then its membership, each message naming the choices."""
    if isinstance(value, bool) or not isinstance(value, type(choices[0])):
        must = "an int" if isinstance(choices[0], int) else f"one of {list(choices)}"
        raise TypeError(f"{name}={value!r} must be {must}.")
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not {what}; choose one of {list(choices)}"
                         + (f" ({why})." if why else "."))


@dataclass(frozen=True)
class VDNNConfig:
    """Everything :class:`~lightning_vdnn.VDNNStrategy` can be told, checked at construction.

    Args:
        activation_offload: vDNN policy for tensors autograd saves for backward. ``"all"`` moves every saved
            activation of at least ``min_offload_bytes`` to host memory (least device memory, most PCIe
            traffic); ``"conv"`` moves only the inputs of Conv/Linear/attention layers, the expensive ones to
            recompute and the large ones to keep (vDNN's ``vDNN_conv``); ``"none"`` installs the hooks and moves
            nothing (measures the hooks' overhead); ``"auto"`` offloads everything on the first step, measures each
            layer, then keeps, offloads or recomputes (activation checkpointing, in backward) each layer: the plan
            of least predicted step time whose predicted peak fits ``memory_budget`` (see ``planning/activation_plan.py``). Only
            ``"auto"`` recomputes, and not under DeepSpeed ZeRO or with layer streaming; it plans per block
            (``layers``, or the model's unambiguous longest list of same-class blocks), else per leaf module.
        min_offload_bytes: saved tensors smaller than this stay on the device: their copy would cost more in
            launch latency than the memory is worth.
        prefetch_layers: how many layers ahead of backward to bring activations back. More hides more copy
            time and holds more device memory.
        max_inflight_bytes: device memory allowed to wait for its copy to the host; past it, compute waits for
            the oldest copy, so a forward pass faster than PCIe cannot fill the device with pending sources.
        pin_memory: use page-locked host buffers (fast, asynchronous copies). Falls back to pageable memory,
            with one warning, if pinning fails.
        layer_streaming: L2L, keep the blocks' parameters, gradients and optimizer state in host memory and
            stream one block at a time to the device (``layers`` names the blocks). ``None`` (the default): off,
            except that ``VDNNStrategy`` with ``activation_offload="auto"`` turns it on, with
            ``resident_blocks="auto"``, when the model's weights, gradients and Adam state alone would fill
            ``memory_budget`` (``planning/when_to_stream.py``), which no activation plan can fix.
        layers: dotted path to the repeated blocks, e.g. ``"model.blocks"``, or a list of paths streamed as one
            sequence in order (``["encoder.block", "decoder.block"]``); ``None`` auto-detects them for layer
            streaming and ``"auto"`` (the longest lists of same-class blocks, or of ``transformers`` layers of
            several classes, not nested in other blocks, all of them when several tie), and means leaf modules
            for the fixed policies.
        resident_blocks: with layer streaming, the first this-many blocks stay on the device with their
            optimizer state, stepped there by the ordinary optimizer; only the rest stream. Spends device memory
            to take work off the host optimizer, which bounds a streamed step (see ``streaming/streamer.py``).
            ``"auto"``: the most blocks that fit ``memory_budget``, chosen after a first step with every block
            streamed (``planning/resident_blocks.py``; ``VDNNStrategy`` on one device). ``None`` (the default): ``"auto"``
            when layer streaming on one device is given a ``memory_budget``, else 0.
        memory_budget: device memory the step must fit into: bytes, ``"8GiB"``, ``"60%"`` of the device, or
            ``None`` for its capacity less a safety margin. What fits it: the ``"auto"`` activation planner,
            and, with layer streaming, the number of resident blocks (``resident_blocks="auto"``; blocks first,
            activations in what they leave).
        selective_recompute: let the ``"auto"`` planner recompute a layer selectively (``offload/selective.py``:
            its matmul and attention outputs kept, the cheap ops run again) where that is cheaper than whole.
            Off by default: it runs the layer's every op through torch's selective-checkpoint dispatch mode, a
            host cost per op the plan does not yet count, and on gpt_1b on an H200 that cost outweighed the
            recompute it saved (``benchmarks/README.md``). Worth trying where the host has slack.
        lean_activations: let the ``"auto"`` planner keep a layer *lean* (``offload/pointwise.py``): the outputs of
            its GELU/SiLU activations, whose inputs it keeps, are not held but made again in backward (one
            elementwise kernel each, exact). The solver takes it where its cost model finds it the cheapest way into
            the budget. Off by default: on gpt_1b on an H200 a lean plan measured no faster than the plan without,
            though predicted faster (``benchmarks/README.md``).
        compiled_activation_budget: what compiled code saves for backward: torch's memory budget for AOTAutograd's
            partitioner, which sheds saves by recomputing the ops that made them inside the compiled backward,
            cheapest first (``planning/compiled_budget.py``). ``"auto"`` (the default): where the ``"auto"``
            planner's first plan recomputes blocks compiled by themselves (``block.compile()``) whole to fit
            ``memory_budget``, the fit lowers torch's budget by what those recomputes shed (to no less than 0.5),
            compiles them again (``torch.compiler.reset()``) and plans again, then corrects the budget once from the
            new plan's measured peak; otherwise torch's setting stands. A number in ``[0, 1]``: torch's budget for
            everything compiled during the fit (1: torch's default, 0: the least saved). None: leave torch's
            setting alone. The setting found is put back after ``fit``. A value recomputed inside a compiled graph
            may differ from the saved one in the last bits. Each compile again costs what the first did: under
            ``mode="max-autotune"``, give a number.
        microbatches: layer-major microbatches (needs ``layer_streaming``): each streamed block runs the batch
            in this many chunks along dim 0 before the next block starts, so its internal activations are
            1/k of the batch while its weights cross PCIe as often as with 1. Modules outside the blocks see
            the whole batch.
        saved_blocks: with layer streaming, how many streamed blocks save what their forward computes for
            backward, as a resident block does, instead of recomputing it in backward: the saves then follow
            ``activation_offload`` (``"all"``/``"conv"`` move them to the host while later blocks compute,
            ``"none"`` keeps them on the device). Trades PCIe traffic or device memory for the recompute, about a
            third of a block's compute. Spread evenly over the streamed blocks. ``None`` (the default): every
            streamed block under ``"all"``/``"conv"``, none under ``"none"``/``"auto"``, except that a
            ``resident_blocks`` chosen from the budget chooses them too (``planning/resident_blocks.py``). ``"auto"`` (with
            ``"none"``, on one device, a fixed ``resident_blocks``): as many as keep the step within
            ``memory_budget`` (None: the device less a margin), chosen after a first step that recomputes them
            all (``planning/saving_blocks.py``).
        batch_chunks: run the module at ``chunk_layers`` over this many dim-0 chunks of its batch, one after
            another (``offload/batch_chunks.py``): with activations offloaded, the step's peak is the working set of its
            largest layers (a CNN's first convolutions), which shrinks k-fold; the bytes saved for backward do not.
            Not for BatchNorm inside it, nor with layer streaming (``microbatches`` does it for the blocks).
            ``"auto"`` (the default): 1, unless the ``"auto"`` planner finds ``memory_budget`` below the peak with
            every activation offloaded; then the fewest chunks (2, 4, ... 32) that bring that peak under it with
            room to plan in (``planning/auto_chunks.py``), of the module that holds the largest layers
            (``chunk_layers``, else the outermost ``nn.Sequential`` above them made only of layers that compute
            each sample on their own: no BatchNorm, no dropout, no custom ``forward``), measured on the next step.
            Where none fits, the planner's ``BudgetTooSmall`` names what was tried. ``VDNNStrategy`` only;
            elsewhere ``"auto"`` is 1.
        chunk_layers: dotted path of the module ``batch_chunks`` splits the batch for, e.g. ``"model.features"``
            (the convolutional trunk of a VGG); it takes the batch first and returns one batch-first tensor. With
            ``batch_chunks="auto"``: the module auto chunking may split (None: found from the profile).
        zero_stage: ZeRO stage, 0 for none. Without layer streaming, DeepSpeed's: 1 shards the optimizer state
            across the ranks, 2 also the gradients, 3 also the parameters (``VDNNZeroStrategy``, ``integrations/deepspeed_strategy.py``);
            activation offload runs inside it unchanged. With layer streaming (``L2LZeroStrategy``,
            ``integrations/l2l_zero_strategy.py``), every stage >= 1 partitions the streamed blocks' host state (gradients,
            optimizer state, the master weights each rank updates) across the ranks, and replicates the
            modules outside the blocks.
        offload_optimizer: keep the optimizer state, and run its step, in host memory (ZeRO-Offload; needs
            ``zero_stage`` >= 1). Frees device memory, costs host compute and PCIe traffic every step. With
            layer streaming on one device (no ``zero_stage``), whose blocks keep their state on the host
            anyway: the modules outside the blocks too (embeddings, norms, head: fp32 masters and optimizer
            state on the host, stepped there after backward, device copies for compute; ``streaming/host_outside.py``).
            Resident blocks are still stepped on the device.
        offload_params: keep the parameters in host memory, fetched per layer (ZeRO-Infinity; needs
            ``zero_stage=3``, the only stage that shards parameters). Not with layer streaming (likewise).
        fit_report: at the end of ``fit``, print a per-layer table of saved activations (``rich``) and save a
            PNG of memory over one step in the run's log directory (rank 0). ``None`` follows the Trainer's
            ``enable_model_summary``: whoever silences the summary at the start of fit (tests, benchmarks,
            sweeps) gets a quiet end too. A :class:`~lightning_vdnn.MemorySummary` in the Trainer's ``callbacks``
            prints it instead, whatever this says. The per-step numbers reach the loggers only through
            :class:`~lightning_vdnn.MemoryMonitor`.
        host_optimizer: with layer streaming, the blocks' host Adam/AdamW: ``"auto"`` (default): with fp32 state
            on a GPU run the native one pass where it builds (bit for bit torch's fused AdamW), else the user's
            optimizer class over each block (fused on a GPU run; on a CPU device the per-tensor loop, bit for bit
            plain), with bf16 state the fastest one-pass kernel, timed at start-up;
            ``"torch"``, ``"deepspeed"`` or ``"native"``: one pass per parameter on that kernel (DeepSpeed's CPU
            Adam; ``"native"``: this package's C++ kernel, built on first use, which writes the bf16 copy the
            device loads and handles bf16 moments and gradients within its one pass; torch's kernel, after a
            warning, where it does not build).
        host_state_dtype: with layer streaming, the precision of the blocks' host state: ``"fp32"`` (default,
            exact) or ``"bf16"``, the lean state: the fp32 master weights stay; Adam's two moments are rounded to
            nearest bf16 after each update, and the gradients are summed in fp32 on the device (microbatches
            included), rounded to bf16 once and kept in bf16 on the host (``streaming/bf16_grads.py``): 10 bytes of
            host memory per parameter instead of 16, losses within 0.1% of fp32 states in the tests; runs the one
            pass. Adam/AdamW only; block parameters' ``p.grad`` stays None during training, and
            ``accumulate_grad_batches`` > 1, gradient clipping and ``16-mixed`` raise (use ``microbatches``).
        report_dir: where ``fit_report`` saves its PNG: a path or any fsspec URL, written through fsspec as the
            loggers write theirs. ``None`` (default): the logger's own log directory (``trainer.log_dir``); with
            ``logger=False`` no PNG (the table is still printed): Lightning writes no logs then, and a file in the
            checkpoint folder or the working directory would be one nobody asked for.
    """

    activation_offload: Policy = option("auto", "offload", what="a policy")
    min_offload_bytes: int = option(2**20, "offload", ge=0)
    prefetch_layers: int = option(1, "offload", ge=1, why="1 is vDNN's one layer ahead")
    max_inflight_bytes: int = option(2**28, "offload", ge=0)
    pin_memory: bool = option(True, "common")
    layer_streaming: Optional[bool] = option(None, "streaming", why="off, unless strategy='vdnn' needs it to fit "
                                                                    "the budget")
    layers: LayerPaths = option(None, "common")
    resident_blocks: ResidentSpec = option(None, "streaming")
    memory_budget: MemorySpec = option(None, "offload")
    selective_recompute: bool = option(False, "offload", why="off: whole-layer recompute only")
    lean_activations: bool = option(False, "offload", why="off: kept layers hold their activation outputs")
    compiled_activation_budget: CompiledBudgetSpec = option("auto", "offload")
    microbatches: int = option(1, "streaming", ge=1)
    saved_blocks: SavedSpec = option(None, "streaming")
    batch_chunks: ChunksSpec = option("auto", "chunks", ge=1, why="1 runs the batch whole; 'auto' chunks only where "
                                                               "the budget needs it")
    chunk_layers: Optional[str] = option(None, "chunks")
    zero_stage: ZeroStage = option(0, "zero", what="a ZeRO stage")
    offload_optimizer: bool = option(False, "zero")
    offload_params: bool = option(False, "zero")
    fit_report: Optional[bool] = option(None, "report", why="follow the Trainer's enable_model_summary")
    report_dir: ReportDir = option(None, "report")
    # -- layer streaming's host update (``streaming/host_update.py``) --
    host_optimizer: HostBackend = option("auto", "streaming", what="a host update backend",
                                         why="'auto': the user's optimizer over each block")
    host_state_dtype: HostStateDtype = option("fp32", "streaming", why="fp32: exact; bf16: Adam's moments and the blocks' gradients in bf16")

    def __post_init__(self) -> None:
        self._check_types()
        for path in self.layer_paths:
            if not _PATH_RE.match(path):
                raise ValueError(
                    f"layers={path!r} is not a dotted attribute path; use e.g. 'model.blocks', a list of such paths, "
                    "or None to detect.")
        path = self.chunk_layers
        if path is not None and (not isinstance(path, str) or not _PATH_RE.match(path)):
            raise ValueError(f"chunk_layers={path!r} is not a dotted attribute path; use e.g. 'model.features'.")
        parse_memory_budget(self.memory_budget)
        self._check_block_counts()
        self._check_compiled_budget()
        config_rules.check(self)  # the fields against each other, now that each is well formed

    def _check_types(self) -> None:
        """The declared types, choices (``Literal``) and lower bounds (``option(..., ge=)``) of every field
        that has a plain one."""
        hints = _hints()
        for f in fields(self):
            value, hint, why = getattr(self, f.name), hints[f.name], f.metadata.get("why", "")
            if typing.get_origin(hint) is Literal:
                _check_choice(f.name, value, typing.get_args(hint), f.metadata["what"], why)
            if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{f.name}={value!r} must be an int.")
            if hint is bool and not isinstance(value, bool):
                raise TypeError(f"{f.name}={value!r} must be True or False.")
            if hint == Optional[bool] and value is not None and not isinstance(value, bool):
                raise TypeError(f"{f.name}={value!r} must be True, False or None ({why}).")
            bound = f.metadata.get("ge")
            if value == "auto" and hint == ChunksSpec:
                continue
            if hint == ChunksSpec and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{f.name}={value!r} must be an int or 'auto'.")
            if bound is not None and value < bound:
                must = "a positive integer" if bound == 1 else f">= {bound}"
                raise ValueError(f"{f.name}={value!r} must be {must}" + (f" ({why})." if why else "."))
        layers = self.layers
        if layers is not None and not isinstance(layers, str):
            if not isinstance(layers, Sequence) or not layers or not all(isinstance(p, str) for p in layers):
                raise TypeError(f"layers={layers!r} must be a dotted path string like 'model.blocks', a non-empty list "
                                "of them, or None.")
            object.__setattr__(self, "layers", layers[0] if len(layers) == 1 else tuple(layers))
        where = self.report_dir
        if where is not None and (not isinstance(where, (str, os.PathLike)) or not os.fspath(where)):
            raise TypeError(f"report_dir={where!r} must be a non-empty path or fsspec URL ('s3://bucket/run'), or None "
                            "(the logger's log directory).")
        if where is not None:
            object.__setattr__(self, "report_dir", os.fspath(where))

    def _check_block_counts(self) -> None:
        """``resident_blocks`` and ``saved_blocks``: a number of blocks >= 0, ``"auto"`` or None."""
        resident, saved = self.resident_blocks, self.saved_blocks
        if resident is not None and (isinstance(resident, bool) or not isinstance(resident, (int, str))):
            raise TypeError(f"resident_blocks={resident!r} must be an int, 'auto' or None.")
        if isinstance(resident, str) and resident != "auto":
            raise ValueError(f"resident_blocks={resident!r} is not understood; give a number of blocks (an int >= 0), "
                             "'auto' to choose it from memory_budget, or None.")
        if isinstance(resident, int) and resident < 0:
            raise ValueError(f"resident_blocks={resident} must be >= 0 (0 streams every block), or 'auto'.")
        if saved is None or saved == "auto":
            return
        if isinstance(saved, bool) or not isinstance(saved, int):
            raise TypeError(f"saved_blocks={saved!r} must be an int (a number of streamed blocks), 'auto' or None.")
        if saved < 0:
            raise ValueError(f"saved_blocks={saved} must be >= 0 (0 recomputes every streamed block), or None.")

    def _check_compiled_budget(self) -> None:
        value = self.compiled_activation_budget
        if value is None or value == "auto":
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"compiled_activation_budget={value!r} must be a number in [0, 1], 'auto' or None.")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"compiled_activation_budget={value!r} must be in [0, 1]: torch's partitioner saves what "
                             "its min cut chooses at 1 and the least at 0 ('auto': lowered where a plan needs it).")

    def refuse_chunks(self, entry: str) -> None:
        """Entry points other than ``VDNNStrategy`` do not chunk: refuse rather than ignore ``batch_chunks``.

        Raises:
            NotImplementedError: ``batch_chunks`` > 1.
        """
        config_rules.refuse_chunks(self, entry)

    def refuse_auto_choices(self) -> None:
        """Entry points other than ``VDNNStrategy`` take a fixed number of resident blocks and saving blocks.

        Raises:
            NotImplementedError: ``resident_blocks`` or ``saved_blocks`` is chosen from the budget.
        """
        config_rules.refuse_auto_choices(self)

    @property
    def streamed_saves(self) -> Optional[int]:
        """``saved_blocks`` as the streamer takes it: the number given, else every streamed block (None) under
        a policy that moves saves (``"all"``/``"conv"``), else 0 (recompute them all)."""
        if self.saved_blocks == "auto":
            return 0  # the first step recomputes every block, and measures them
        if self.saved_blocks is not None:
            return self.saved_blocks
        return None if self.activation_offload in ("all", "conv") else 0

    @property
    def auto_resident(self) -> bool:
        """Whether the resident blocks are chosen from ``memory_budget``: ``"auto"``, or None with layer
        streaming on one device and a budget."""
        return self.resident_blocks == "auto" or (
            self.resident_blocks is None and bool(self.layer_streaming) and self.memory_budget is not None
            and not self.zero_stage and self.saved_blocks != "auto")

    @property
    def streams_if_needed(self) -> bool:
        """Whether ``"auto"`` decides layer streaming (``layer_streaming`` unset): on when the model's own state
        would fill the budget (``planning/when_to_stream.py``)."""
        return self.layer_streaming is None and self.activation_offload == "auto"

    @property
    def fixed_chunks(self) -> int:
        """The batch chunks set from the start: the number given, else 1 (``"auto"`` chunks only once a step shows
        the budget needs it)."""
        return 1 if self.batch_chunks == "auto" else self.batch_chunks

    @property
    def fixed_resident(self) -> int:
        """The resident blocks a streamer starts with: the number given, else 0 (``"auto"`` profiles with every
        block streamed)."""
        return self.resident_blocks if isinstance(self.resident_blocks, int) else 0

    @property
    def layer_paths(self) -> tuple[str, ...]:
        """``layers`` as a tuple of paths (empty: detect)."""
        return () if self.layers is None else (self.layers,) if isinstance(self.layers, str) else self.layers

    @property
    def offload_policy(self) -> str:
        """The policy the offloader runs: ``"auto"`` is ``"all"`` with the planner's layers kept in place."""
        return "all" if self.activation_offload == "auto" else self.activation_offload

    @property
    def budget(self) -> Optional[MemoryBudget]:
        return parse_memory_budget(self.memory_budget)
