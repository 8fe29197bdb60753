"""Hugging Face ``transformers`` conventions a streamed block call meets, handled without importing the library.

- **Caches.** A decoder layer called with a cache object (``cache=``, ``past_key_values=``, ``layer_past=``, or
  positionally, as GPT-2 passes it) and ``use_cache=True`` writes its keys and values into the cache. Layer
  streaming runs a block's forward again in backward, which would write them twice, so a training call (one
  that records a graph) gets no cache, with one warning: what ``transformers`` itself does for layers under
  gradient checkpointing (``GradientCheckpointingLayer``). The loss and gradients do not depend on the cache.
- **Gradient checkpointing.** ``model.gradient_checkpointing_enable()`` sets ``gradient_checkpointing`` on each
  layer, which then runs its forward under ``torch.utils.checkpoint``. A streamed block recomputes already:
  checkpointing it again would run its forward a third time, so streaming turns the flag off on the blocks it
  streams (one warning) and puts it back when it stops. Resident blocks keep it.
- **A batch folded into dim 0.** Bloom passes its blocks the ALiBi bias as ``alibi`` of shape
  ``(batch * heads, 1, keys)``, the batch outermost (``build_alibi_tensor``'s ``reshape(batch_size * num_heads,
  ...)``, or ``repeat(batch_size, 1, 1)`` without padding): under microbatches it splits in runs of ``heads`` rows
  per sample (:func:`folded_batch`). Only arguments known by name are split so: a tensor whose dim 0 merely is a
  multiple of the batch (a table of positions) goes whole to every chunk, as before.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

#: Keyword arguments through which ``transformers`` layers receive a cache object, by version and model.
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")


#: Block arguments that hold the batch folded into dim 0 with another dimension, the batch outermost.
FOLDED_BATCH_KEYWORDS = ("alibi",)


def folded_batch(name: str) -> bool:
    """Whether the block argument ``name`` (as ``CallFlat.names`` gives it) holds the batch folded into dim 0, the
    batch outermost: a keyword of :data:`FOLDED_BATCH_KEYWORDS`."""
    return name in FOLDED_BATCH_KEYWORDS


def is_cache(value: Any) -> bool:
    """A ``transformers`` cache object (``DynamicCache``, ``EncoderDecoderCache``, ...), by what it does."""
    return hasattr(value, "get_seq_length") and hasattr(value, "update")


class TrainingCalls:
    """Takes the cache out of a block's training calls, warning once per streamer."""

    def __init__(self) -> None:
        self.warned = False

    def strip(self, args: tuple, kwargs: dict, where: str) -> tuple[tuple, dict]:
        dropped = []
        if kwargs.get("use_cache") is True:
            kwargs = {**kwargs, "use_cache": False}
            dropped.append("use_cache=False")
        for key in CACHE_KEYWORDS:
            if kwargs.get(key) is not None and is_cache(kwargs[key]):
                kwargs = {**kwargs, key: None}
                dropped.append(f"{key}=None")
        if any(is_cache(a) for a in args):
            args = tuple(None if is_cache(a) else a for a in args)
            dropped.append("no positional cache")
        if dropped and not self.warned:
            self.warned = True
            warnings.warn(f"lightning_vdnn: layer streaming recomputes {where} in backward, which would write its "
                          f"key/value cache twice; training calls run with {', '.join(dropped)}, as transformers does "
                          "under gradient checkpointing. Set use_cache=False (model.config.use_cache = False) to "
                          "silence this.", stacklevel=4)
        return args, kwargs


def checkpointing_off(modules: list[nn.Module], where: str) -> list[nn.Module]:
    """Turn ``transformers``' per-layer gradient checkpointing off on ``modules``; returns those it was on for."""
    were = [m for m in modules if getattr(m, "gradient_checkpointing", False) is True]
    for m in were:
        m.gradient_checkpointing = False
    if were:
        warnings.warn(f"lightning_vdnn: gradient checkpointing is on for {where}; layer streaming recomputes the blocks "
                      "it streams already, so it is off for those while they stream (resident blocks keep it).",
                      stacklevel=4)
    return were


def checkpointing_on(modules: list[nn.Module]) -> None:
    """Put back what :func:`checkpointing_off` turned off."""
    for m in modules:
        m.gradient_checkpointing = True
