"""``L2LZeroStrategy``: L2L layer streaming on several ranks, each rank keeping 1/N of the blocks' host state.

The Lightning glue of ``streaming/sharded.py`` (the mechanism). It is Lightning's ``DDPStrategy`` (launch, ranks,
samplers, gloo on CPUs and NCCL on GPUs), not DeepSpeed's: DeepSpeed's engine would take the streamed
parameters over. What ``zero_stage`` means here:

* **the streamed blocks**: at every stage 1, 2 and 3 their host state is partitioned across the ranks: each
  rank keeps and updates 1/N of every block's gradients and optimizer state (with the fp32 master range it
  updates), blocks are all-gathered onto the device for compute and their gradients reduce-scattered. The
  stages do not differ for them: the device never holds more than the two block slots anyway.
* **the modules outside the blocks** (embeddings, final norm, head, and ``resident_blocks``): replicated at
  every stage, gradients averaged by DDP's reducer (the streamed parameters are excluded from it).

Its registered name is ``"l2l_zero"``; ``strategy_for(config)`` builds it for a config with layer streaming and a
ZeRO stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from dataclasses import fields
from datetime import timedelta
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from torch.optim import Optimizer
from typing_extensions import override

from lightning_vdnn.integrations.checkpoint_io import AtomicByDefault
from lightning_vdnn.config import VDNNConfig
from lightning_vdnn.integrations.options import L2L_ZERO, config_from
from lightning_vdnn.integrations.adapters.torch import ddp_ignore, ddp_unignore
from lightning_vdnn.integrations.lightning_hooks import OffloadHooks
from lightning_vdnn.integrations.model_init import built_on_host
from lightning_vdnn.integrations.sharded_clipping import with_sharded_clipping
from lightning_vdnn.report.memory_report import MemoryReport
from lightning_vdnn.streaming.collectives import Collectives
from lightning_vdnn.streaming.partition import Partition
from lightning_vdnn.streaming.sharded import ShardedLayerStreamer
from lightning_vdnn.streaming.sharded_optimizer_state import full_optimizer_state
from lightning_vdnn.integrations.trainer_settings import follow_trainer

_FIELDS = frozenset(f.name for f in fields(VDNNConfig))


def _is_option(keyword: str) -> bool:
    """A ``VDNNConfig`` field or a near miss of one (checked as an option); other keywords go to DDP."""
    return keyword in _FIELDS or bool(difflib.get_close_matches(keyword, _FIELDS, n=1, cutoff=0.8))


class L2LZeroStrategy(AtomicByDefault, OffloadHooks, DDPStrategy):
    """Data-parallel L2L: blocks stream from host memory on every rank, whose host holds 1/N of their gradients
    and optimizer state (ZeRO-Offload's partitioned CPU optimizer, per block); the rest of the model is
    replicated (DDP). vDNN activation offload works on top, per rank.

    Args:
        activation_offload, min_offload_bytes, prefetch_layers, max_inflight_bytes, memory_budget, fit_report,
            report_dir:
            vDNN on each rank, as in :class:`~lightning_vdnn.VDNNConfig` (default ``"none"``, as ``"l2l"``).
        zero_stage: 1, 2 or 3, all the same for the streamed blocks (partitioned host state) and for the
            modules outside them (replicated); see the module docstring.
        layers, resident_blocks, microbatches, saved_blocks, pin_memory: layer streaming, as in
            :class:`~lightning_vdnn.VDNNStrategy`. Resident blocks are replicated like the modules outside.
        vdnn_config: a ready :class:`VDNNConfig` (``layer_streaming=True``, ``zero_stage`` >= 1); options given
            as well replace its values.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
            process_group_backend, timeout, **ddp_kwargs: as in Lightning's ``DDPStrategy`` (``ddp_kwargs`` go
            to ``DistributedDataParallel`` for the replicated modules).

    Raises:
        ValueError: a config without layer streaming or ZeRO stage, ``precision="16-mixed"`` (at set-up: its
            loss scaler reads ``p.grad``), ``predict`` on several ranks (uneven batches would leave ranks
            waiting in a collective), and what :class:`VDNNConfig` raises.

    Every rank must call what gathers (Lightning does: checkpoints): ``synchronize()`` before reading block
    parameters between steps; the parameters are current on every rank after ``fit``. Checkpoints are one
    file with whole weights and optimizer state, as one process writes: they resume here on any number of
    ranks, and load in plain Lightning on one.

    Example::

        import lightning_vdnn
        trainer = Trainer(strategy="l2l_zero", accelerator="gpu", devices=8, precision="bf16-mixed")
        trainer.fit(model)
    """

    strategy_name = "l2l_zero"
    _plain_precision: Optional[Precision] = None  # the Trainer's plugin while fit clips through a subclass

    @L2L_ZERO.signed
    def __init__(
        self,
        *args: Any,
        vdnn_config: Optional[VDNNConfig] = None,
        accelerator: Any = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        **ddp_kwargs: Any,
    ) -> None:
        options = {k: ddp_kwargs.pop(k) for k in list(ddp_kwargs) if _is_option(k)}
        self.vdnn_config = config_from(vdnn_config, L2L_ZERO, args, options)
        cfg = self.vdnn_config
        if not cfg.layer_streaming or not cfg.zero_stage:
            raise ValueError(
                f"L2LZeroStrategy partitions streamed blocks across ranks, so it needs layer_streaming=True and "
                f"zero_stage=1, 2 or 3, not layer_streaming={cfg.layer_streaming}, zero_stage={cfg.zero_stage}. "
                "Without layer streaming use VDNNZeroStrategy (strategy='vdnn_zero2'); on one device "
                "VDNNStrategy (strategy='l2l').")
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timeout, **ddp_kwargs)
        self._streamer: Optional[ShardedLayerStreamer] = None
        self._comm: Optional[Collectives] = None
        self._partitions: Optional[list[Partition]] = None  # kept after fit: checkpoints consolidate by them
        self._failed = False

    @property
    def config(self) -> VDNNConfig:
        return self.vdnn_config

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _collectives(self) -> Collectives:
        """One process group of all ranks for the blocks' collectives, apart from DDP's (made once)."""
        if self._comm is None:
            self._comm = Collectives(dist.new_group(), self.root_device)
        return self._comm

    @override
    @contextlib.contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Iterator[None]:
        """``configure_model`` and ``trainer.init_module()`` build in host memory (``integrations/model_init.py``)."""
        with super().tensor_init_context(empty_init), built_on_host(True):
            yield

    @override
    def model_to_device(self) -> None:
        module = self.lightning_module
        precision = getattr(self.precision_plugin, "precision", "32-true")
        self._streamer = ShardedLayerStreamer.from_config(module, self.config, self.root_device,
                                                          self._collectives(), precision,
                                                          local_world=self.num_processes)
        self._failed = False
        streamed = {id(p) for b in self._streamer.blocks for p in b.params}
        names = [n for n, p in module.named_parameters(remove_duplicate=False) if id(p) in streamed]
        ddp_ignore(module, names)

    @override
    def configure_ddp(self) -> None:
        streamed = {id(p) for b in self._streamer.blocks for p in b.params}
        if any(p.requires_grad and id(p) not in streamed for p in self.lightning_module.parameters()):
            super().configure_ddp()  # else nothing for DDP to reduce, and it refuses such a module

    @override
    def setup(self, trainer: Any) -> None:
        if trainer.state.fn == "predict" and self.world_size > 1:
            raise ValueError(
                f"predict with L2LZeroStrategy on {self.world_size} ranks: its sampler gives ranks unequal "
                "batch counts, and every rank must gather each streamed block together. Predict on one "
                "process (Trainer(devices=1) with strategy='l2l'), or with validate/test, whose samplers pad.")
        super().setup(trainer)  # DDPStrategy: model_to_device (the streamer), DDP over the rest, optimizers
        if trainer.state.fn == "fit":
            follow_trainer(self._streamer, trainer, self.precision_plugin)
            self._streamer.attach_optimizers(self.optimizers)
            # clipping needs the norm over every rank's pieces: the plugin's class, clipping overridden
            self._plain_precision = self.precision_plugin
            self.precision_plugin = with_sharded_clipping(self.precision_plugin, self._streamer)
            self._attach()

    @override
    def on_exception(self, exception: BaseException) -> None:
        # no collectives while tearing down: the other ranks may not be there
        self._failed = self._streamer is not None
        super().on_exception(exception)

    def _release(self) -> None:
        """Weights gathered (unless a rank failed), streamer closed, hooks removed; partitions kept."""
        if self._offloader is not None or self._streamer is not None:
            self._last_report = self.memory_report()
        streamer, self._streamer = self._streamer, None
        with contextlib.ExitStack() as closing:  # last in, first out; each runs even if one before it raised
            closing.callback(self._close_offloader)
            if streamer is not None:
                self._partitions = None if self._failed else streamer.partitions
                closing.callback(self._unmark)
                closing.callback(streamer.close, gather=not self._failed)

    def _unmark(self) -> None:
        """Take back what set-up put on the module and the precision plugin for the streamed blocks."""
        ddp_unignore(self.lightning_module)
        plain, self._plain_precision = self._plain_precision, None
        if plain is not None:
            self.precision_plugin = plain

    # -- checkpoints: whole weights and optimizer state, as one process writes them --------------------------
    def _check_not_failed(self) -> None:
        if self._failed and self._streamer is None:
            raise RuntimeError(
                "The last run of L2LZeroStrategy failed while the blocks streamed, so they were not gathered: on "
                "this rank their weights and optimizer state are current only in its own range. Resume from the "
                "last checkpoint saved before the failure.")

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        self._check_not_failed()
        if self._streamer is not None:
            self._streamer.gather_weights()
        return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        self._check_not_failed()
        optimizer = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        partitions = self._streamer.partitions if self._streamer is not None else self._partitions
        if not partitions:
            return super().optimizer_state(optimizer)
        if self._streamer is not None:
            self._streamer.synchronize()
        state = full_optimizer_state(optimizer, partitions, self._collectives())
        return state if self.is_global_zero else {}

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        if self._streamer is None:
            return super().load_optimizer_state_dict(checkpoint)
        self._streamer.load_optimizer_states(self.optimizers, checkpoint["optimizer_states"])  # this rank's ranges

    # -- the rest --------------------------------------------------------------------------------------
    def _offload_layers(self) -> Any:
        """The streamed blocks are the layers activation prefetch counts in."""
        return self._streamer.container if self._streamer is not None else super()._offload_layers()

    def synchronize(self) -> None:
        """Collective, on every rank: queued block updates written and every rank's block parameters
        gathered whole (before reading them directly between steps)."""
        if self._streamer is not None:
            self._streamer.gather_weights()

    def memory_report(self) -> MemoryReport:
        """This rank's activation offload and layer-streaming statistics of the latest training step."""
        report = self._offload_report()
        return report if self._streamer is None else dataclasses.replace(report, **self._streamer.stats())
