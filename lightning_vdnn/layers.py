"""Finding the repeated blocks of a model: the unit vDNN prefetches by and L2L streams by; and wrapping a found
module's ``forward`` on the instance, so the user's code stays untouched."""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, Optional

from torch import nn

_NONE = object()


def block_lists(root: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.ModuleList``/``nn.Sequential`` under ``root`` whose children (at least two) share one class."""
    found = {}
    for name, module in root.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            if len({type(child) for child in module}) == 1:
                found[name] = module
    return found


def detected_blocks(root: nn.Module) -> Optional[nn.Module]:
    """The longest list of same-class blocks under ``root`` when there is exactly one such longest list, else
    None: where ``"auto"`` plans by block, it needs a unit that no guess can get wrong."""
    lists = block_lists(root)
    if not lists:
        return None
    longest = max(len(m) for m in lists.values())
    best = [m for m in lists.values() if len(m) == longest]
    return best[0] if len(best) == 1 else None


def offload_units(root: nn.Module, path: Optional[str], plans_recompute: bool) -> Optional[nn.Module]:
    """The layers activation offload prefetches by and the ``"auto"`` planner decides by: the blocks at
    ``path``; else, for a planner that may recompute, the model's repeated blocks when one list of them is
    unambiguously the longest (recomputing a whole block spares its internals, recomputing one op spares
    little); else None, every leaf module."""
    if path:
        return resolve_layers(root, path)[1]
    return detected_blocks(root) if plans_recompute else None


def _candidates(root: nn.Module) -> str:
    names = [f"{n!r} ({len(m)} x {type(m[0]).__name__})" for n, m in block_lists(root).items()]
    return ", ".join(names) if names else "none found"


def resolve_layers(root: nn.Module, path: str | None) -> tuple[str, nn.Module]:
    """The block container at dotted ``path`` under ``root``; with ``None``, the longest one found.

    Raises:
        ValueError: the path does not exist, is not a list of same-class blocks, or (auto-detection) there is
            no candidate or the longest is ambiguous. The message lists the candidates and how to set ``layers``.
    """
    if path is None:
        lists = block_lists(root)
        if not lists:
            raise ValueError(
                f"layers=None: found no nn.ModuleList or nn.Sequential of two or more blocks of one class in "
                f"{type(root).__name__}. Put the repeated blocks in an nn.ModuleList and pass layers='<path>'."
            )
        longest = max(len(m) for m in lists.values())
        best = [n for n, m in lists.items() if len(m) == longest]
        if len(best) > 1:
            raise ValueError(
                f"layers=None is ambiguous: {best} all hold {longest} blocks. Candidates: {_candidates(root)}. "
                f"Pass layers='<one of them>'."
            )
        return best[0], lists[best[0]]
    module = resolve_module(root, path, "layers", f"Candidates: {_candidates(root)}.")
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        raise ValueError(
            f"layers={path!r} is a {type(module).__name__}, not an nn.ModuleList/nn.Sequential of blocks. "
            f"Candidates: {_candidates(root)}."
        )
    classes = sorted({type(child).__name__ for child in module})
    if len(classes) > 1:
        raise ValueError(
            f"layers={path!r} holds blocks of different classes {classes}; streaming needs identical blocks. "
            f"Candidates: {_candidates(root)}."
        )
    return path, module


def resolve_module(root: nn.Module, path: str, argument: str, hint: Optional[str] = None) -> nn.Module:
    """The submodule at dotted ``path`` under ``root``, which the user gave as ``argument``.

    Raises:
        ValueError: no such submodule; the message ends with ``hint`` (default: the modules two levels down).
    """
    try:
        return root.get_submodule(path)
    except AttributeError:
        if hint is None:
            names = [n for n, _ in root.named_modules() if n and n.count(".") < 2]
            hint = f"Modules: {names[:40]}{' ...' if len(names) > 40 else ''}."
        raise ValueError(f"{argument}={path!r} does not exist in {type(root).__name__}. {hint}") from None


def wrap_forward(module: nn.Module, wrapper: Callable[..., Any]) -> Callable[[], None]:
    """Make ``module(...)`` run ``wrapper(inner, *args, **kwargs)``, where ``inner`` is the forward the module had;
    returns what puts that forward back. Set on the instance and bound to it (``MethodType``): a deepcopy of the
    module (EMA, SWA) runs its own forward, not the original's."""
    own = vars(module).get("forward", _NONE)

    @functools.wraps(type(module).forward)
    def forward(this: nn.Module, *args: Any, **kwargs: Any) -> Any:
        inner = own if own is not _NONE else functools.partial(type(this).forward, this)
        return wrapper(inner, *args, **kwargs)

    module.forward = types.MethodType(forward, module)

    def restore() -> None:
        if own is _NONE:
            vars(module).pop("forward", None)
        else:
            module.forward = own

    return restore
