"""The strategy group's schema: a typo or a wrongly typed value in a Hydra override fails at compose time.

Without it, ``strategy.activation_offlod=all`` is refused with advice to append it (``+``), which then fails
only when the strategy is built, and ``strategy=l2l strategy.min_offload_bytes=0`` is refused although the
argument exists. The schema is generated from ``VDNNStrategy.__init__``, so it cannot drift from it; the
group's YAML files list it first in their defaults. Values are still checked by :class:`VDNNConfig` when the
strategy is built (``recipes/train.py`` builds it before loading any data).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Literal, Optional, Union

from hydra.core.config_store import ConfigStore

from lightning_vdnn.integrations.lightning_strategy import VDNNStrategy

#: Name of the schema in the ``strategy`` group (``defaults: [vdnn_schema, _self_]``).
SCHEMA = "vdnn_schema"
#: Constructor arguments that are objects Lightning fills in, not configuration.
_NOT_CONFIG = frozenset({"self", "device", "accelerator", "checkpoint_io", "precision_plugin", "config"})


def _field_type(hint: Any) -> Any:
    """The closest type OmegaConf can enforce: Literal -> str, Optional[x] kept, other unions -> Any."""
    if hint in (int, float, bool, str):
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return str
    if origin is Union and len(args) == 2 and type(None) in args:
        inner = _field_type(next(a for a in args if a is not type(None)))
        return Optional[inner] if inner is not Any else Any
    return Any


def strategy_schema(cls: type = VDNNStrategy, target: str = "lightning_vdnn.VDNNStrategy") -> type:
    """A dataclass with ``_target_`` and one typed field per configuration argument of ``cls.__init__``."""
    hints = typing.get_type_hints(cls.__init__)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=target))]
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in _NOT_CONFIG or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = "???" if param.default is param.empty else param.default  # "???": OmegaConf's MISSING
        fields.append((name, _field_type(hints.get(name, Any)), dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Conf", fields)


def register() -> None:
    """Store the schema as ``strategy/vdnn_schema`` (done on ``import lightning_vdnn.conf``)."""
    ConfigStore.instance().store(group="strategy", name=SCHEMA, node=strategy_schema())
