"""lightning_vdnn: train models larger than GPU memory with one word in your Lightning Trainer.

``import lightning_vdnn`` registers the strategy names (``"vdnn"``, ``"vdnn_all"``, ``"vdnn_conv"``,
``"vdnn_none"``) with Lightning, so ``Trainer(strategy="vdnn_all")`` works with no other change.
"""

from lightning_vdnn.config import MemoryBudget, VDNNConfig, parse_memory_budget
from lightning_vdnn.offload import ActivationOffloader
from lightning_vdnn.report import MemoryReport
from lightning_vdnn.strategy import REGISTERED, VDNNStrategy, register

__version__ = "0.1.0"
__all__ = [
    "ActivationOffloader",
    "MemoryBudget",
    "MemoryReport",
    "REGISTERED",
    "VDNNConfig",
    "VDNNStrategy",
    "parse_memory_budget",
]

register()
