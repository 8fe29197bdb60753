"""The strategy group's schemas: a typo or a wrongly typed value in a Hydra override fails at compose time.

Without them, ``strategy.activation_offlod=all`` is refused with advice to append it (``+``), which then fails
only when the strategy is built. Each schema is generated from the options its class takes
(``integrations/options.py``, from :class:`~lightning_vdnn.VDNNConfig`'s fields), so it cannot drift from them;
every strategy YAML but ``plain`` names its class's schema first in its defaults. Values are still checked by
``VDNNConfig`` when the strategy is built (``recipes/train.py`` builds it before loading any data).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from typing import Any, Literal, Optional, Union

from hydra.core.config_store import ConfigStore

from lightning_vdnn.integrations.options import L2L_ZERO, VDNN_STRATEGY, VDNN_ZERO, Entry, config_hints

#: Schema name in the ``strategy`` group -> (the class's entry, its ``_target_``, constructor arguments besides
#: the options that a YAML may set: the DeepSpeed ``config``, ...; objects Lightning fills in are left out).
SCHEMAS: dict[str, tuple[Entry, str, tuple[str, ...]]] = {
    "vdnn_schema": (VDNN_STRATEGY, "lightning_vdnn.VDNNStrategy", ()),
    "vdnn_zero_schema": (VDNN_ZERO, "lightning_vdnn.VDNNZeroStrategy",
                         ("config", "load_full_weights", "logging_level", "process_group_backend")),
    "l2l_zero_schema": (L2L_ZERO, "lightning_vdnn.L2LZeroStrategy", ("process_group_backend",)),
}
#: The schema of ``VDNNStrategy`` (``defaults: [vdnn_schema, _self_]``).
SCHEMA = "vdnn_schema"


def _field_type(hint: Any) -> Any:
    """The closest type OmegaConf can enforce: Literal -> its values' type, Optional[x] kept, other unions -> Any."""
    if hint in (int, float, bool, str):
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return type(args[0])  # VDNNConfig checks the value itself
    if origin is Union and len(args) == 2 and type(None) in args:
        inner = _field_type(next(a for a in args if a is not type(None)))
        return Optional[inner] if inner is not Any else Any
    return Any


def strategy_schema(entry: Entry, target: str, extras: tuple[str, ...] = ()) -> type:
    """A dataclass with ``_target_``, one typed field per option ``entry`` takes (with its default), and the
    ``extras`` of the class's constructor."""
    hints = config_hints()
    fields: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=target))]
    for arg, f in entry.fields.items():
        default = entry.default(f)
        kind = _field_type(hints[f.name])
        fields.append((arg, Optional[kind] if default is None and kind is not Any else kind,
                       dataclasses.field(default=default)))
    params = inspect.signature(_target(target)).parameters
    for name in extras:
        fields.append((name, _field_type(params[name].annotation), dataclasses.field(default=params[name].default)))
    return dataclasses.make_dataclass(f"{target.rsplit('.', 1)[1]}Conf", fields)


def _target(path: str) -> Any:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def register() -> None:
    """Store the schemas in the ``strategy`` group (done on ``import lightning_vdnn.conf``)."""
    for name, (entry, target, extras) in SCHEMAS.items():
        ConfigStore.instance().store(group="strategy", name=name, node=strategy_schema(entry, target, extras))
