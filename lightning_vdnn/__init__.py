"""lightning_vdnn: train models larger than GPU memory with one word in your Lightning Trainer.

``import lightning_vdnn`` registers the strategy names (``"vdnn"``, ``"vdnn_all"``, ``"vdnn_conv"``,
``"vdnn_none"``, ``"l2l"``, and Lightning only, ``"vdnn_zero1"``/``"2"``/``"3"`` for DeepSpeed ZeRO and
``"l2l_zero"`` for layer streaming on several ranks) with
Lightning and Fabric, so ``Trainer(strategy="vdnn_all")`` and ``Fabric(strategy="vdnn_all")`` work with no
other change; ``offload_activations(model)`` does the same for a
plain PyTorch loop, and ``lightning_vdnn.integrations.accelerate.prepare`` for Hugging Face Accelerate.
"""

from lightning_vdnn.integrations.torch_loop import ActivationOffload, offload_activations, stream_layers
from lightning_vdnn.config import MemoryBudget, VDNNConfig, parse_memory_budget
from lightning_vdnn.loss import chunked_cross_entropy
from lightning_vdnn.offload.offloader import ActivationOffloader
from lightning_vdnn.report.memory_report import LayerStats, MemoryReport, MemorySample
from lightning_vdnn.report.callbacks import MemoryMonitor, MemorySummary
from lightning_vdnn.planning.oom_retry import BudgetLowered, StepOutOfMemory
from lightning_vdnn.integrations.fabric import VDNNFabricStrategy
from lightning_vdnn.integrations.lightning_strategy import VDNNStrategy
from lightning_vdnn.integrations.deepspeed_strategy import VDNNZeroStrategy
from lightning_vdnn.integrations.l2l_zero_strategy import L2LZeroStrategy
from lightning_vdnn.integrations.registry import (
    REGISTERED, REGISTERED_L2L_ZERO, REGISTERED_ZERO, register, register_fabric, register_l2l_zero, register_zero,
    strategy_for)

__version__ = "0.1.0"
__all__ = [
    "ActivationOffload",
    "ActivationOffloader",
    "BudgetLowered",
    "L2LZeroStrategy",
    "LayerStats",
    "MemoryBudget",
    "MemoryMonitor",
    "MemoryReport",
    "MemorySample",
    "MemorySummary",
    "REGISTERED",
    "REGISTERED_L2L_ZERO",
    "REGISTERED_ZERO",
    "StepOutOfMemory",
    "VDNNConfig",
    "VDNNFabricStrategy",
    "VDNNStrategy",
    "VDNNZeroStrategy",
    "chunked_cross_entropy",
    "offload_activations",
    "stream_layers",
    "strategy_for",
    "parse_memory_budget",
]

register()
register_zero()  # vdnn_zero1/2/3: Lightning's DeepSpeed strategy with activation offload
register_l2l_zero()  # l2l_zero: layer streaming on several ranks, the blocks' host state partitioned
register_fabric()  # the same names in Lightning Fabric's registry
