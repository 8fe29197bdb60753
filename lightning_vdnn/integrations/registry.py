"""The strategy names ``import lightning_vdnn`` registers with Lightning and Fabric, and the class a config needs.

A name is a class and the options it is built with; nothing else chooses a class. :func:`strategy_for` picks
it from a :class:`~lightning_vdnn.VDNNConfig`: one device, DeepSpeed ZeRO, or layer streaming across ranks.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry

from lightning_vdnn.config import VDNNConfig
from lightning_vdnn.integrations.deepspeed_strategy import VDNNZeroStrategy
from lightning_vdnn.integrations.fabric import VDNNFabricStrategy
from lightning_vdnn.integrations.l2l_zero_strategy import L2LZeroStrategy
from lightning_vdnn.integrations.lightning_strategy import VDNNStrategy
from lightning_vdnn.integrations.options import FABRIC

#: ``VDNNStrategy``'s names: name -> (description, options).
REGISTERED = {
    "vdnn": ("vDNN activation offload planned to fit the device ('auto'); the blocks stream (L2L) when the "
             "model's own state does not fit", {"activation_offload": "auto"}),
    "vdnn_all": ("vDNN: offload every saved activation to host memory", {"activation_offload": "all"}),
    "vdnn_conv": ("vDNN: offload the inputs of Conv/Linear/attention layers", {"activation_offload": "conv"}),
    "vdnn_none": ("vDNN hooks installed, nothing moved (overhead baseline)", {"activation_offload": "none"}),
    "l2l": ("L2L: block weights, grads and optimizer state in host memory, streamed one block ahead",
            {"layer_streaming": True, "activation_offload": "none"}),
}
#: ``VDNNZeroStrategy``'s names.
REGISTERED_ZERO = {
    f"vdnn_zero{stage}": (f"vDNN activation offload ('auto') inside DeepSpeed ZeRO stage {stage}",
                          {"zero_stage": stage})
    for stage in (1, 2, 3)
}
#: ``L2LZeroStrategy``'s names.
REGISTERED_L2L_ZERO = {
    "l2l_zero": ("L2L layer streaming on several ranks, each keeping 1/N of the blocks' host state (ZeRO)",
                 {"zero_stage": 2}),
}


def strategy_for(config: VDNNConfig, **lightning: Any) -> Any:
    """The Lightning strategy that runs ``config``: ``VDNNStrategy`` without a ZeRO stage, ``L2LZeroStrategy``
    with one and layer streaming, else ``VDNNZeroStrategy``. ``lightning``: the class's other arguments
    (``accelerator``, ``precision_plugin``, ...).

    Example::

        config = VDNNConfig(layer_streaming=True, zero_stage=2, layers="model.blocks")
        trainer = Trainer(strategy=lightning_vdnn.strategy_for(config), devices=4)
    """
    if not config.zero_stage:
        return VDNNStrategy(config=config, **lightning)
    if config.layer_streaming:
        return L2LZeroStrategy(vdnn_config=config, **lightning)
    return VDNNZeroStrategy(vdnn_config=config, **lightning)


def _register(cls: type, names: dict[str, tuple[str, dict[str, Any]]]) -> None:
    for name, (description, options) in names.items():
        StrategyRegistry.register(name, cls, description=description, override=True, **options)


def register() -> None:
    """Register ``REGISTERED`` with Lightning (done on ``import lightning_vdnn``)."""
    _register(VDNNStrategy, REGISTERED)


def register_zero() -> None:
    """Register ``vdnn_zero1``/``2``/``3`` with Lightning (done on ``import lightning_vdnn``)."""
    _register(VDNNZeroStrategy, REGISTERED_ZERO)


def register_l2l_zero() -> None:
    """Register ``l2l_zero`` with Lightning (done on ``import lightning_vdnn``)."""
    _register(L2LZeroStrategy, REGISTERED_L2L_ZERO)


def fabric_supported(options: dict[str, Any]) -> bool:
    """Whether a registered name's options are all ones Fabric takes, and valid (built) today."""
    if not FABRIC.takes(options):
        return False
    try:
        FABRIC.config((), options)
    except (ValueError, TypeError, NotImplementedError):
        return False
    return True


def register_fabric() -> list[str]:
    """Register the names of ``REGISTERED`` that Fabric supports with Fabric; returns them."""
    names = []
    for name, (description, options) in REGISTERED.items():
        if fabric_supported(options):
            STRATEGY_REGISTRY.register(name, VDNNFabricStrategy, description=description, override=True, **options)
            names.append(name)
    return names
