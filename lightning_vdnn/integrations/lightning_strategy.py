"""``VDNNStrategy``: the Lightning glue. Mechanism lives in ``offload/offloader.py``; configuration in ``config.py``; the
hooks it shares with the DeepSpeed strategy (``integrations/deepspeed_strategy.py``) in ``integrations/lightning_hooks.py``."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional, Union

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer
from typing_extensions import override

from lightning_vdnn.planning.when_to_stream import stream_reason
from lightning_vdnn.integrations.checkpoint_io import AtomicByDefault
from lightning_vdnn.offload.batch_chunks import BatchChunks
from lightning_vdnn.config import VDNNConfig
from lightning_vdnn.integrations.options import VDNN_STRATEGY, config_from
from lightning_vdnn.integrations.lightning_hooks import OffloadHooks
from lightning_vdnn.integrations.model_init import built_on_host, may_stream
from lightning_vdnn.integrations.early_grad_free import free_stale_grads, frees_early
from lightning_vdnn.integrations.trainer_settings import check_bf16_grads, follow_trainer
from lightning_vdnn.streaming.host_outside import OutsideStepper, outside_params
from lightning_vdnn.offload.offloader import ActivationOffloader
from lightning_vdnn.planning.activation_plan import AutoPlanner, Later, Plan, device_budget
from lightning_vdnn.planning.activation_solver import BudgetTooSmall
from lightning_vdnn.planning.auto_chunks import AutoChunks
from lightning_vdnn.report.memory_report import MemoryReport
from lightning_vdnn.planning.resident_blocks import AutoResidency, PeakMeter, differs, switch
from lightning_vdnn.planning.saving_blocks import AutoSaving
from lightning_vdnn.streaming.streamer import LayerStreamer


class VDNNStrategy(AtomicByDefault, OffloadHooks, SingleDeviceStrategy):
    """Train a model whose activations do not fit on the device, by keeping them in host memory.

    Activations that autograd saves for backward are copied to pinned host memory on a side stream while
    forward produces them and prefetched back one layer ahead of backward (vDNN, Rhu et al. 2016). The user's
    LightningModule is untouched: the hooks wrap its ``training_step``.

    Takes every option of :class:`~lightning_vdnn.VDNNConfig` by keyword (its defaults; ``activation_offload``
    also by position), or ``config=``, a ready one; a misspelt keyword raises ``TypeError`` naming the closest.

    Args:
        activation_offload: ``"all"``, ``"conv"``, ``"none"`` or ``"auto"`` (see :class:`VDNNConfig`).
        min_offload_bytes: saved tensors smaller than this stay on the device (default 1 MiB).
        prefetch_layers: layers brought back ahead of backward (default 1, as in vDNN).
        max_inflight_bytes: device memory that may wait for its copy to the host before compute waits for it.
        pin_memory: page-locked host buffers (default True; falls back to pageable with a warning).
        layers: dotted path from the LightningModule to its repeated blocks (``"model.blocks"``); blocks then
            are the layers prefetch counts in. ``None``: every leaf module is a layer.
        memory_budget: what ``"auto"`` fits the step into: bytes, ``"8GiB"``, ``"60%"``, or None (the device
            less a margin). A budget below the smallest reachable peak fails after the first step, stating it.
            A CUDA out-of-memory error in a step lowers it (one ``BudgetLowered`` warning each time), re-plans
            and runs the same batch again (``planning/oom_retry.py``), up to 3 times per batch. With ``layer_streaming`` it
            also chooses ``resident_blocks`` (the default then is ``"auto"``).
        layer_streaming: L2L (``streaming/streamer.py``): the blocks at ``layers`` (``None`` detects them) keep weights,
            grads and optimizer state in host memory; one block computes on the device while the next arrives.
            ``None`` (default): with ``"auto"``, on when the model's weights, gradients and Adam state alone would
            fill ``memory_budget`` (one log line says so; ``planning/when_to_stream.py``), with ``resident_blocks="auto"``;
            else off.
        resident_blocks: with ``layer_streaming``, the first N blocks stay on the device (weights and optimizer
            state), so the host updates only the rest: faster when the host optimizer bounds the step, at about
            16 bytes per parameter of those blocks with Adam. Must leave at least one block to stream.
            ``"auto"``: the most blocks that fit ``memory_budget``, chosen after a first step with every block
            streamed and lowered if a later step's measured peak exceeds the budget (``planning/resident_blocks.py``).
            ``None`` (default): ``"auto"`` when ``memory_budget`` is given, else 0.
        microbatches: with ``layer_streaming``, each block runs the batch in this many chunks (dim 0), all
            through block i before block i+1: block activations shrink k-fold, weight traffic stays that of 1.
            Without layer streaming, a value above 1 raises ``ValueError``.
        saved_blocks: with ``layer_streaming``, how many streamed blocks save their activations (moved to the
            host by ``"all"``/``"conv"``, kept by ``"none"``) instead of recomputing them in backward; ``None``:
            all under ``"all"``/``"conv"``, none otherwise; ``"auto"`` (with ``"none"``): as many as keep their
            activations within ``memory_budget``, chosen after a first step (see :class:`~lightning_vdnn.VDNNConfig`).
        batch_chunks, chunk_layers: run the module at ``chunk_layers`` (``"model.features"``) over
            ``batch_chunks`` dim-0 chunks of its batch, one after another (``offload/batch_chunks.py``): the working set of its
            largest layers, which bounds the peak once activations are offloaded, shrinks k-fold. Not with
            BatchNorm inside it, nor with layer streaming. ``"auto"`` (default): chunks only where the budget is
            below the all-offloaded peak, of the module holding the largest layers (``planning/auto_chunks.py``).
        fit_report: at the end of ``fit``, print a per-layer table (``rich``) and save a PNG of memory over one
            step in the logger's log directory (none with ``logger=False``); ``None`` (default) does so when the
            Trainer summarizes the model (``enable_model_summary``, on by default).
        report_dir: where that PNG goes instead: a path or any fsspec URL (see :class:`VDNNConfig`).
        host_optimizer, host_state_dtype: with ``layer_streaming``, the blocks' host Adam kernel and the precision
            of its moments and of the blocks' host gradients (``streaming/host_update.py``,
            ``streaming/bf16_grads.py``; see :class:`VDNNConfig`).
        offload_optimizer: with ``layer_streaming`` (one device), the modules outside the blocks keep fp32 masters
            and optimizer state in host memory and are stepped there (``streaming/host_outside.py``); the device holds
            their compute copies. Otherwise DeepSpeed's ZeRO-Offload, below.
        zero_stage, offload_optimizer, offload_params: DeepSpeed ZeRO, which is
            :class:`~lightning_vdnn.VDNNZeroStrategy` (``strategy="vdnn_zero2"``); a ZeRO stage here raises
            ``ValueError`` pointing there, so a one-device run can never silently drop it; with
            ``layer_streaming=True`` it points to :class:`~lightning_vdnn.L2LZeroStrategy` (``strategy="l2l_zero"``).
            :func:`~lightning_vdnn.strategy_for` picks the class a ``VDNNConfig`` needs.
        config: a ready :class:`VDNNConfig`; options given as well replace its values.
        device: the device to train on; normally left to the Trainer's ``accelerator``/``devices``.

    Raises:
        ValueError, TypeError: at construction, for any argument out of range, naming the value.

    Example::

        import lightning_vdnn
        trainer = Trainer(strategy="vdnn_all", accelerator="gpu", devices=1, precision="bf16-mixed")
        trainer.fit(model)
        print(trainer.strategy.memory_report())
    """

    strategy_name = "vdnn"
    _eager_before = 0  # block updates queued during backward by streamers replaced since fit began
    _retry_oom = True  # one device: a batch can run again after an out-of-memory error (``planning/oom_retry.py``)
    _recompute = True  # "auto" plans may recompute layers in backward (``offload/recompute.py``)

    @VDNN_STRATEGY.signed
    def __init__(self, *args: Any, device: Union[str, torch.device, None] = None, accelerator: Any = None,
                 checkpoint_io: Optional[CheckpointIO] = None, precision_plugin: Optional[Precision] = None,
                 config: Optional[VDNNConfig] = None, **options: Any) -> None:
        self.config = config_from(config, VDNN_STRATEGY, args, options)
        if self.config.zero_stage and self.config.layer_streaming:
            raise ValueError(
                f"layer_streaming=True with zero_stage={self.config.zero_stage} streams the blocks on several ranks, "
                "which is L2LZeroStrategy (strategy='l2l_zero'), not VDNNStrategy (one device). Use "
                f"lightning_vdnn.L2LZeroStrategy(zero_stage={self.config.zero_stage}, ...), or "
                "lightning_vdnn.strategy_for(config), which picks the class from a VDNNConfig.")
        if self.config.zero_stage:
            raise ValueError(
                f"zero_stage={self.config.zero_stage} needs DeepSpeed, and VDNNStrategy trains on one device "
                f"without it. Use Trainer(strategy='vdnn_zero{self.config.zero_stage}') or "
                f"lightning_vdnn.VDNNZeroStrategy(zero_stage={self.config.zero_stage}, ...)."
            )
        super().__init__(device=device or "cpu", accelerator=accelerator, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin)
        self._device_given = device is not None
        self._offloader: Optional[ActivationOffloader] = None
        self._planner: Optional[AutoPlanner] = None
        self._forward_peak: Optional[int] = None
        self._last_report: Optional[MemoryReport] = None
        self._streamer: Optional[LayerStreamer] = None
        self._residency: Optional[AutoResidency] = None
        self._saving: Optional[AutoSaving] = None
        self._outside: list[OutsideStepper] = []
        self._chunks: Optional[BatchChunks] = None
        self._auto_chunks: Optional[AutoChunks] = None  # batch_chunks="auto" in a fit
        #: what measures the device's peak for ``resident_blocks``/``saved_blocks="auto"``; None: CUDA's
        #: allocator statistics (nothing on a CPU device). Set before ``fit`` to measure otherwise (tests on CPU do).
        self.peak_meter: Optional[PeakMeter] = None

    @property
    def vdnn_config(self) -> VDNNConfig:
        """``config``, under the name the shared offload hooks (``integrations/lightning_hooks.py``) read."""
        return self.config

    # The accelerator connector fills ``parallel_devices`` from Trainer(accelerator=..., devices=...); a single
    # device strategy exposes it so that ``strategy="vdnn_all"`` follows the Trainer's device choice.
    @property
    def parallel_devices(self) -> Optional[list[torch.device]]:
        return [self._root_device] if self._device_given else None

    @parallel_devices.setter
    def parallel_devices(self, devices: Optional[list[torch.device]]) -> None:
        if not devices:
            return
        if len(devices) > 1 and self.config.layer_streaming:
            raise ValueError(
                f"VDNNStrategy trains on one device, but the Trainer asked for {len(devices)} ({devices}). For layer "
                "streaming on several devices, each keeping 1/N of the blocks' host state, use strategy='l2l_zero' "
                "(L2LZeroStrategy(zero_stage=2, ...)); else devices=1."
            )
        if len(devices) > 1:
            raise ValueError(
                f"VDNNStrategy trains on one device, but the Trainer asked for {len(devices)} ({devices}). "
                "Use devices=1, or for several devices DeepSpeed ZeRO with activation offload: "
                "strategy='vdnn_zero2' (or 'vdnn_zero3', which also shards the parameters)."
            )
        self._root_device = torch.device(devices[0])
        self._device_given = True

    # -- lifecycle ---------------------------------------------------------------------------------------
    @override
    @contextlib.contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Iterator[None]:
        """``configure_model`` and ``trainer.init_module()`` build in host memory where the blocks may stream
        (``integrations/model_init.py``)."""
        with super().tensor_init_context(empty_init), built_on_host(may_stream(self.config)):
            yield

    @override
    def model_to_device(self) -> None:
        self._stream_if_state_fills_budget()
        if not self.config.layer_streaming:
            return super().model_to_device()
        # L2L: the blocks' weights stay in host memory; everything else goes to the device ("auto": all
        # blocks stream in the first step, which measures what fits)
        self._streamer = self._build_streamer(self.config.fixed_resident)  # "auto": all streamed, first

    def _stream_if_state_fills_budget(self) -> None:
        """``"auto"`` with ``layer_streaming`` unset: stream the blocks when the model's state alone would fill
        the budget (``planning/when_to_stream.py``), before the model moves and runs out of memory."""
        cfg = self.config
        if not cfg.streams_if_needed or self._host_is_device():
            return
        budget = device_budget(cfg.budget, self.root_device)
        reason = stream_reason(self.lightning_module, budget, self._precision(), cfg.layers, cfg.fixed_chunks)
        if reason is not None:
            rank_zero_info(reason)
            resident = "auto" if cfg.resident_blocks is None else cfg.resident_blocks
            self.config = dataclasses.replace(cfg, layer_streaming=True, resident_blocks=resident)

    def _host_is_device(self) -> bool:
        """On a CPU device the weights are in host memory already: streaming them there gains nothing."""
        return self.root_device.type == "cpu"

    def _precision(self) -> str:
        return getattr(self.precision_plugin, "precision", "32-true")

    def _build_streamer(self, resident: Optional[int], recompute_from: Optional[int] = None) -> LayerStreamer:
        return LayerStreamer.from_config(self.lightning_module, self.config, self.root_device, self._precision(),
                                         resident, recompute_from)

    @override
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        cfg = self.config
        if cfg.fixed_chunks > 1 and self._chunks is None:  # every stage: predict holds less too
            self._chunks = BatchChunks(self.lightning_module, cfg.chunk_layers, cfg.batch_chunks)
        if self._streamer is not None and trainer.state.fn == "fit":
            if self._streamer.lean_grads:
                check_bf16_grads(trainer)
            follow_trainer(self._streamer, trainer, self.precision_plugin)
            self._streamer.attach_optimizers(self.optimizers)
            if self.config.offload_optimizer:  # after: its step hook runs once the blocks' updates are queued
                self._outside = self._step_outside_on_host()
            if self.config.auto_resident or self.config.saved_blocks == "auto":  # one or the other (config.py)
                meter = self.peak_meter or PeakMeter(self.root_device)
                budget = device_budget(self.config.budget, self.root_device)
                if self.config.auto_resident:
                    policy = self.config.activation_offload
                    self._residency = AutoResidency(
                        budget, meter, activations=policy != "all",  # "auto" offloads only what blocks leave
                        grads_in_forward=not frees_early(trainer),
                        saving=self.config.saved_blocks is None and policy in ("none", "auto"),
                        # not under "auto": its planner would offload the saving blocks' activations, which is slower
                        widen=self.root_device.type == "cuda" and policy == "none")
                else:
                    self._saving = AutoSaving(budget, meter)
        if trainer.state.fn == "fit":
            self._attach()
            if cfg.batch_chunks == "auto" and self._planner is not None and self._streamer is None:
                self._auto_chunks = AutoChunks(self.lightning_module, cfg.chunk_layers)

    @override
    def _observe(self, planner: AutoPlanner, peak: Optional[int], later: Optional[Later]) -> Optional[Plan]:
        """``batch_chunks="auto"``: a budget below the all-offloaded floor chunks the batch of the module that
        holds the largest layers, and the next step profiles again (``planning/auto_chunks.py``)."""
        try:
            return super()._observe(planner, peak, later)
        except BudgetTooSmall as err:
            if self._auto_chunks is None:
                raise
            rank_zero_info(self._auto_chunks.too_small(err, planner.floor, planner.budget, self._offloader))
            return None

    def _step_outside_on_host(self) -> list[OutsideStepper]:
        """``offload_optimizer=True``: the modules outside the blocks keep masters and state on the host."""
        params = outside_params(self.lightning_module, self._streamer.container)
        ids = {id(p) for p in params}
        cuda = self.root_device.type == "cuda"
        return [OutsideStepper(opt, params, pin=self.config.pin_memory and cuda, fused=cuda) for opt in self.optimizers
                if any(id(p) in ids for g in opt.param_groups for p in g["params"])]

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        free_stale_grads(self.lightning_module.trainer, batch_idx)
        if self._residency is not None and self._streamer is not None:
            self._place_blocks()
        if self._saving is not None and self._streamer is not None:
            self._choose_saving()

    def _frees_grads_early(self) -> bool:
        return frees_early(self.lightning_module.trainer)

    def _place_blocks(self) -> None:
        """``resident_blocks="auto"``, between two steps: measure, choose, and switch the streamer if the
        choice changed (``planning/resident_blocks.py``)."""
        step = self.lightning_module.trainer.global_step
        planner = self._planner
        keeps = planner is not None and planner.plan is not None and bool(planner.plan.kept)
        choice = self._residency.between_steps(step, self._streamer, self.optimizers, keeps)
        streamer = self._streamer
        if choice is not None and differs(choice, streamer):
            eager = sum(s.eager_updates for s in streamer.steppers)
            self._streamer = switch(streamer, choice, self.optimizers, self._build_streamer)
            if self._streamer is not streamer:
                self._eager_before += eager
                for outside in self._outside:
                    outside.rehook()  # after the new streamer's hooks, as at setup
            rank_zero_info(f"lightning_vdnn resident_blocks='auto': {choice.describe(len(streamer.container))}.")
            if planner is not None:  # blocks first: activations get what they leave, measured afresh
                planner.plan = None
                self._offloader.keep_layers = None
        self._residency.watch(step, self._streamer, timed=planner is None or planner.plan is not None)

    def _choose_saving(self) -> None:
        """``saved_blocks="auto"``, between two steps: measure, choose, and tell the streamer (``planning/saving_blocks.py``)."""
        step = self.lightning_module.trainer.global_step
        count = self._saving.between_steps(step, self._streamer)
        if count is not None:
            self._streamer.set_saving(count)
        self._saving.watch(step, self._streamer)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._streamer is not None:
            self._streamer.synchronize()  # host updates still queued land before the weights are read
        return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self._streamer is not None:
            self._streamer.synchronize()
        return super().optimizer_state(optimizer)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        if self._streamer is None:
            return super().load_optimizer_state_dict(checkpoint)
        self._streamer.load_optimizer_states(self.optimizers, checkpoint["optimizer_states"])
        for outside in self._outside:
            outside.keep_state_on_host()

    def _offload_layers(self) -> Any:
        """L2L: the streamed blocks are the layers prefetch counts in."""
        layers = super()._offload_layers()
        return self._streamer.container if self._streamer is not None else layers

    def synchronize(self) -> None:
        """Wait for the streamed blocks' queued host updates (layer streaming; a no-op otherwise): call it
        before reading block parameters directly between ``optimizer.step()`` and the next forward."""
        if self._streamer is not None:
            self._streamer.synchronize()

    def memory_report(self) -> MemoryReport:
        """Offload (and layer-streaming) statistics of the latest training step (empty before training)."""
        report = self._offload_report()
        for chunks in (self._chunks, self._auto_chunks):
            report = report if chunks is None else dataclasses.replace(report, **chunks.report_fields())
        if self._streamer is None:
            return report
        residency = self._residency.stats() if self._residency is not None else {}
        saving = self._saving.stats() if self._saving is not None else {}
        return dataclasses.replace(report, **self._streamer.stats(), **residency, **saving)

    def _release(self) -> None:
        """Streams drained, hooks removed, host buffers freed: the strategy can run ``fit`` again."""
        if self._offloader is not None or self._streamer is not None:
            self._last_report = self.memory_report()
        if self._auto_chunks is not None:
            self._auto_chunks.close()
            self._auto_chunks = None
        streamer, outside = self._streamer, self._outside
        if streamer is not None:
            self._last_eager_updates = self._eager_before + sum(s.eager_updates for s in streamer.steppers)
        chunks = self._chunks
        self._streamer, self._residency, self._eager_before, self._outside, self._chunks = None, None, 0, [], None
        self._saving = None
        with contextlib.ExitStack() as closing:  # last in, first out; each runs even if one before it raised
            if chunks is not None:
                closing.callback(chunks.close)
            closing.callback(self._close_offloader)
            for stepper in reversed(outside):
                closing.callback(stepper.close)
            if streamer is not None:
                closing.callback(streamer.close)

