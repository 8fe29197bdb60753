"""A streamed block's ``state_dict()`` entries each get a storage of their own, aliasing the same memory.

The block's host weights are views of one flat buffer (``streaming/host_state.py``), and savers that look at
storages take views of one storage for tied weights: safetensors (Accelerate's ``save_state``, its
``save_model``/``load_model``) keeps one name per storage and drops the others from the file, then refuses to
load it. A slice of a storage (``untyped_storage()[a:b]``, no copy) is a storage of its own over those bytes
that keeps the buffer alive; a tensor set on it is what the same weight in an ordinary module looks like to
every saver.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def own_storages(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``register_state_dict_post_hook`` hook: each tensor under ``prefix`` that views a larger storage is
    replaced by an alias with its own. Parameters themselves (``state_dict(keep_vars=True)``) are left as
    they are; one tensor under two names (weights tied inside the block) stays one tensor."""
    aliases: dict[tuple, Tensor] = {}
    for key, value in state_dict.items():
        if (key.startswith(prefix) and type(value) is Tensor and value.is_contiguous()
                and value.untyped_storage().nbytes() > value.nbytes > 0):
            view = (value.data_ptr(), value.dtype, value.shape)
            if view not in aliases:
                start = value.storage_offset() * value.element_size()
                storage = value.untyped_storage()[start:start + value.nbytes]
                aliases[view] = value.new_empty(0).set_(storage, 0, value.shape)
            state_dict[key] = aliases[view]
