"""Finding the repeated blocks of a model: the unit vDNN prefetches by and L2L streams by; and wrapping a found
module's ``forward`` on the instance, so the user's code stays untouched."""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, Optional, Sequence, Union

from torch import nn

_NONE = object()


#: What ``layers`` takes: one dotted path, several (streamed as one sequence, in order), or None to detect.
LayerPaths = Union[None, str, Sequence[str]]


def block_lists(root: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.ModuleList``/``nn.Sequential`` under ``root`` of at least two blocks (children of one class, or
    of several that are all ``transformers`` layers) that lies inside no block of another such list (an MoE
    layer's experts, a stage's layers are parts of a block, not the blocks)."""
    found: dict[str, nn.Module] = {}
    inside: set[int] = set()
    for name, module in root.named_modules():
        if id(module) in inside:
            continue
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            classes = {type(child) for child in module}
            if len(classes) == 1 or all(map(_transformers_layer, classes)):
                found[name] = module
                inside.update(id(m) for child in module for m in child.modules())
    return found


def _transformers_layer(cls: type) -> bool:
    """``transformers`` derives each model's encoder and decoder layer classes from ``GradientCheckpointingLayer``
    (read by name, not imported): a list of several such classes is the model's layers (Jamba's attention and
    Mamba layers, Mllama's self- and cross-attention ones), where any other list of mixed classes may be anything."""
    return any(c.__name__ == "GradientCheckpointingLayer" and c.__module__.startswith("transformers.")
               for c in cls.__mro__)


def _classes(blocks: nn.Module) -> str:
    return "/".join(dict.fromkeys(type(child).__name__ for child in blocks))


def _longest(root: nn.Module) -> list[str]:
    """The paths of the longest lists of :func:`block_lists`: one, or several of equal length (an encoder's and a
    decoder's), in the order the model registers them."""
    lists = block_lists(root)
    if not lists:
        return []
    longest = max(len(m) for m in lists.values())
    return [n for n, m in lists.items() if len(m) == longest]


def detected_blocks(root: nn.Module) -> Optional[nn.Module]:
    """The blocks of the longest lists of :func:`block_lists` under ``root`` (several when they tie), else None."""
    paths = _longest(root)
    return resolve_layers(root, paths)[1] if paths else None


def offload_units(root: nn.Module, path: LayerPaths, plans_recompute: bool) -> Optional[nn.Module]:
    """The layers activation offload prefetches by and the ``"auto"`` planner decides by: the blocks at
    ``path``; else, for a planner that may recompute, the model's repeated blocks (recomputing a whole block spares
    its internals, recomputing one op spares little); else None, every leaf module."""
    if path:
        return resolve_layers(root, path)[1]
    return detected_blocks(root) if plans_recompute else None


def _candidates(root: nn.Module) -> str:
    names = [f"{n!r} ({len(m)} x {_classes(m)})" for n, m in block_lists(root).items()]
    return ", ".join(names) if names else "none found"


def resolve_layers(root: nn.Module, layers: LayerPaths) -> tuple[str, nn.Module]:
    """The blocks at ``layers`` under ``root``: ``(label, container)``. One path gives its container; several
    give an ``nn.ModuleList`` of their blocks in order (owned by the model, not by the list), labelled with the
    paths joined by ``", "``. ``None`` detects them: the longest lists of :func:`block_lists`, all of them when
    several tie (T5's encoder and decoder stacks). A list named by path may hold blocks of any classes.

    Raises:
        ValueError: a path does not exist, is not a list of blocks, or names blocks another path names too, or
            (detection) there is no candidate. The message lists the candidates and how to set ``layers``.
    """
    if layers is None:
        paths = _longest(root)
        if not paths:
            raise ValueError(
                f"layers=None: found no nn.ModuleList or nn.Sequential of two or more blocks of one class in "
                f"{type(root).__name__}. Put the repeated blocks in an nn.ModuleList and pass layers='<path>'."
            )
    else:
        paths = [layers] if isinstance(layers, str) else list(layers)
        if not paths:
            raise ValueError("layers=[] names no blocks; pass a dotted path, a list of them, or None to detect.")
    containers = [_one_list(root, p) for p in paths]
    if len(containers) == 1:
        return paths[0], containers[0]
    blocks = [b for c in containers for b in c]
    if len({id(b) for b in blocks}) != len(blocks):
        raise ValueError(f"layers={paths!r} name some blocks twice (one path lies inside another); name each list "
                         f"of blocks once. Candidates: {_candidates(root)}.")
    return ", ".join(paths), nn.ModuleList(blocks)


def _one_list(root: nn.Module, path: str) -> nn.Module:
    module = resolve_module(root, path, "layers", f"Candidates: {_candidates(root)}.")
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        raise ValueError(
            f"layers={path!r} is a {type(module).__name__}, not an nn.ModuleList/nn.Sequential of blocks. "
            f"Candidates: {_candidates(root)}."
        )
    return module


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
