"""``VDNNZeroStrategy``: vDNN activation offload inside Lightning's DeepSpeed strategy (ZeRO stages 1-3).

ZeRO shards what is per parameter (optimizer state, gradients, parameters) across the ranks; vDNN moves what
is per sample (activations) to host memory. The two compose: the offloader's saved-tensor hooks wrap the
DeepSpeed engine's forward, and parameters (which ZeRO-3 gathers and frees per layer) are never offloaded.
Lightning's ``DeepSpeedStrategy`` does the rest (launch, engine, precision, checkpoints); this module only
builds its config from :class:`~lightning_vdnn.VDNNConfig`, lets it run on CPUs (gloo), and adds the hooks.
Layer streaming on several ranks is ``L2LZeroStrategy`` (DDP, the streamed blocks' host state partitioned
across the ranks), since DeepSpeed's engine would take the streamed parameters over.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Optional, Union

import torch
from lightning.fabric.plugins import ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy
from typing_extensions import override

from lightning_vdnn.integrations.checkpoint_io import publish_dir, remove_published, version_dir
from lightning_vdnn.config import VDNNConfig
from lightning_vdnn.integrations.options import VDNN_ZERO, config_from
from lightning_vdnn.integrations.adapters.deepspeed import device_rank
from lightning_vdnn.integrations.lightning_hooks import OffloadHooks

DEFAULT_STAGE = 2


def deepspeed_config(vdnn: VDNNConfig, user: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The DeepSpeed config: the user's (a copy), with ZeRO's stage and offload devices from ``vdnn``.

    Raises:
        ValueError: the user's config says otherwise than ``vdnn`` (a stage, or an offload device other than
            ``cpu``), naming both values.
    """
    cfg = copy.deepcopy(user) if user else {}
    zero = cfg.setdefault("zero_optimization", {})
    _agree(zero, "stage", vdnn.zero_stage, "zero_optimization.stage", f"zero_stage={vdnn.zero_stage}")
    offload = {"device": "cpu", "pin_memory": vdnn.pin_memory}
    if vdnn.offload_optimizer:
        _agree(zero.setdefault("offload_optimizer", dict(offload)), "device", "cpu",
               "zero_optimization.offload_optimizer.device", "offload_optimizer=True")
    if vdnn.offload_params:
        _agree(zero.setdefault("offload_param", dict(offload)), "device", "cpu",
               "zero_optimization.offload_param.device", "offload_params=True")
    cfg.setdefault("zero_allow_untested_optimizer", True)  # the LightningModule's torch.optim optimizers
    # ZeRO-Offload refuses a torch optimizer unless told; DeepSpeedCPUAdam is faster, torch's works everywhere
    cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    return cfg


def _agree(section: dict[str, Any], key: str, ours: Any, path: str, argument: str) -> None:
    theirs = section.setdefault(key, ours)
    if theirs != ours:
        raise ValueError(
            f"The DeepSpeed config sets {path}={theirs!r}, but the strategy was given {argument}, which means "
            f"{path}={ours!r}. Make them agree: change the argument, or drop {path} from the config."
        )


def _plain(config: Any) -> Any:
    """A mapping (Hydra hands over a ``DictConfig``) as nested dicts and lists, which DeepSpeed expects."""
    if isinstance(config, Mapping):
        return {k: _plain(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)) or type(config).__name__ == "ListConfig":
        return [_plain(v) for v in config]
    return config


def _stage_of(user: Optional[dict[str, Any]]) -> int:
    """``zero_stage=None``: the user's config decides, else ZeRO-2 (Lightning's DeepSpeed default)."""
    return (user or {}).get("zero_optimization", {}).get("stage", DEFAULT_STAGE)


class VDNNZeroStrategy(OffloadHooks, DeepSpeedStrategy):
    """Data-parallel training with DeepSpeed ZeRO and vDNN activation offload: ZeRO shards the model's state
    across the ranks, vDNN keeps each rank's activations in host memory.

    Args:
        activation_offload, min_offload_bytes, prefetch_layers, max_inflight_bytes, pin_memory, layers,
            memory_budget, fit_report, report_dir: as in :class:`~lightning_vdnn.VDNNConfig`; each rank offloads
            (and, with ``"auto"``, plans) its own activations; rank 0 prints the report. An out-of-memory error is
            not retried here (a rank running its batch again would leave the others waiting in a collective).
        zero_stage: 1 shards the optimizer state, 2 also the gradients, 3 also the parameters. ``None``: the
            stage of ``config``, else 2.
        offload_optimizer: optimizer state and step in host memory (ZeRO-Offload). A ``torch.optim`` optimizer
            works; ``deepspeed.ops.adam.DeepSpeedCPUAdam`` in ``configure_optimizers`` is faster.
        offload_params: parameters in host memory between uses (ZeRO-Infinity); needs ``zero_stage=3``.
        config: a DeepSpeed config (dict or JSON path; default the ``PL_DEEPSPEED_CONFIG_PATH`` variable) for
            everything else (buckets, overlap, NVMe); the arguments above fill in ``zero_optimization``.
        vdnn_config: a ready :class:`VDNNConfig`; options given as well replace its values.
        layer_streaming: ``True`` raises ``ValueError`` naming :class:`~lightning_vdnn.L2LZeroStrategy`
            (``strategy="l2l_zero"``), which streams layers on several ranks (DeepSpeed's engine would take the
            streamed parameters over); :func:`~lightning_vdnn.strategy_for` picks the class from a config.
            ``resident_blocks``, ``microbatches`` > 1 and ``saved_blocks`` need it, and raise here.
        accelerator, parallel_devices, cluster_environment, precision_plugin, process_group_backend,
            logging_level, load_full_weights, timeout: as in Lightning's ``DeepSpeedStrategy``.

    Raises:
        ValueError: a stage out of range, ``offload_params`` below stage 3, or ``config`` contradicting an
            argument, naming both values.

    Runs on CUDA GPUs (nccl) and, for tests and debugging, CPUs (gloo; DeepSpeed must pick its ``cpu``
    accelerator, as it does when CUDA is absent or ``DS_ACCELERATOR=cpu``).

    Example::

        import lightning_vdnn
        trainer = Trainer(strategy="vdnn_zero3", accelerator="gpu", devices=8, precision="bf16-mixed")
        trainer.fit(model)
        print(trainer.strategy.memory_report())   # this rank's activation offload
    """

    strategy_name = "vdnn_zero"

    @VDNN_ZERO.signed
    def __init__(
        self,
        *args: Any,
        config: Optional[Union[_PATH, dict[str, Any]]] = None,
        vdnn_config: Optional[VDNNConfig] = None,
        accelerator: Any = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        logging_level: int = logging.WARN,
        load_full_weights: bool = False,
        timeout: Optional[timedelta] = default_pg_timeout,
        **options: Any,
    ) -> None:
        user = self._load_config(_plain(config))  # Lightning's: reads a path; None: $PL_DEEPSPEED_CONFIG_PATH
        stage = {} if options.get("zero_stage") is not None else {"zero_stage": _stage_of(user)}
        self.vdnn_config = config_from(vdnn_config, VDNN_ZERO, args, options, **stage)
        self.vdnn_config.refuse_chunks("VDNNZeroStrategy (DeepSpeed)")
        cfg = self.vdnn_config
        if not cfg.zero_stage:
            where = "layer streaming on one device use VDNNStrategy (strategy='l2l')" if cfg.layer_streaming else (
                "one device without DeepSpeed use VDNNStrategy (strategy='vdnn')")
            raise ValueError(f"VDNNZeroStrategy needs zero_stage=1, 2 or 3, not zero_stage=0. For {where}.")
        if cfg.layer_streaming:
            raise ValueError(
                f"layer_streaming=True with zero_stage={cfg.zero_stage} is L2LZeroStrategy (strategy='l2l_zero'), "
                "not DeepSpeed's engine, which would take the streamed parameters over. Use "
                f"lightning_vdnn.L2LZeroStrategy(zero_stage={cfg.zero_stage}, ...) (in Hydra: strategy=l2l_zero), or "
                "lightning_vdnn.strategy_for(config), which picks the class from a VDNNConfig.")
        super().__init__(
            accelerator=accelerator, config=deepspeed_config(self.vdnn_config, user),
            parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            precision_plugin=precision_plugin, process_group_backend=process_group_backend,
            logging_level=logging_level, load_full_weights=load_full_weights, timeout=timeout,
        )

    # -- where it may run --------------------------------------------------------------------------------
    @override
    def setup_environment(self) -> None:
        # DeepSpeedStrategy refuses everything but CUDA; DeepSpeed itself also runs on CPUs, over gloo
        if not isinstance(self.accelerator, (CUDAAccelerator, CPUAccelerator)):
            raise RuntimeError(
                f"VDNNZeroStrategy runs on CUDA GPUs or CPUs, not on {type(self.accelerator).__name__}. "
                "Use accelerator='gpu' (or 'cpu' for a test run)."
            )
        _check_deepspeed_accelerator(self.root_device)
        DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        if self.root_device.type != "cpu":
            return super().setup_distributed()
        # as DeepSpeedStrategy's, less its check that device indices match local ranks: CPUs have no index
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @override
    def _setup_model_and_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        with self._cpu_device_rank():
            return super()._setup_model_and_optimizer(*args, **kwargs)

    @override
    def _initialize_deepspeed_inference(self, model: Any) -> None:
        with self._cpu_device_rank():
            super()._initialize_deepspeed_inference(model)

    # -- checkpoints: DeepSpeed writes a directory of shards in place; published atomically instead ------------
    @override
    def save_checkpoint(self, checkpoint: dict, filepath: _PATH, storage_options: Optional[Any] = None) -> None:
        """Every rank writes its shards into a fresh versioned directory beside ``filepath``; then the first
        rank of each node points ``filepath`` at it in one atomic rename (:func:`checkpoint.publish_dir`), so
        a kill during a save leaves the previous checkpoint whole and loadable. ``filepath`` is a symlink."""
        filepath = self.broadcast(str(filepath))
        tag = self.broadcast(f"v{uuid.uuid4().hex[:12]}")
        written = version_dir(filepath, tag)
        super().save_checkpoint(checkpoint, written, storage_options=storage_options)
        self.barrier("vdnn_zero_checkpoint_written")
        if self.local_rank == 0:
            publish_dir(written, filepath, f"{tag}-{self.node_rank}")
        self.barrier("vdnn_zero_checkpoint_published")

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero and not remove_published(filepath):
            super().remove_checkpoint(filepath)

    def _cpu_device_rank(self) -> contextlib.AbstractContextManager:
        """On a CPU, ``deepspeed.initialize`` gets the rank's local rank as its device (``adapters/deepspeed.py``
        says why Lightning's call cannot); elsewhere nothing changes."""
        if self.root_device.type != "cpu":
            return contextlib.nullcontext()
        return device_rank(self.local_rank)

    # -- training ----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)  # the DeepSpeed engine now holds the model
        if trainer.state.fn == "fit":
            self._attach()


def _check_deepspeed_accelerator(device: torch.device) -> None:
    """DeepSpeed picks its accelerator once per process, by itself; it must be the Trainer's device type."""
    from deepspeed.accelerator import get_accelerator

    theirs = get_accelerator().device_name()
    if theirs != device.type:
        raise RuntimeError(
            f"DeepSpeed's accelerator is {theirs!r} but the Trainer trains on {device.type!r}. Start the process "
            f"with DS_ACCELERATOR={device.type} in the environment (DeepSpeed reads it once, on import), or "
            f"choose the Trainer's accelerator to match."
        )

