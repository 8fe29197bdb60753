"""What a segment costs the activation solver (``planning/activation_solver.py``): a run of consecutive layers
``[start, end)`` recomputed as one (``offload/recompute.py``'s ``SegmentRunner``) holds its first layer's inputs and
what the code after its last saves, and rebuilds everything else at once in backward."""

from __future__ import annotations

from typing import Sequence

from lightning_vdnn.offload.trace import LayerProfile

#: Most layers in one recomputed segment (bounds the work per layer; a longer run is rarely wanted).
MAX_SEGMENT = 32
Segment = tuple[int, int]  # layers [start, end), recomputed as one


def segments_ending(layers: Sequence[LayerProfile], last: int) -> list[tuple[int, int, int, float]]:
    """The segments of two or more layers that end with layer ``last`` and may be recomputed as one, as (start,
    bytes held, bytes rebuilt, recompute ms): each layer after the first continues the chain
    (``SegmentFacts.joins``), the first may start one, and no tensor saved inside is saved again after it."""
    out: list[tuple[int, int, int, float]] = []
    facts = layers[last].segment
    if facts is None or not facts.joins:
        return out
    reach, ms = facts.reach, layers[last].forward_ms
    for first in range(last - 1, max(-1, last - MAX_SEGMENT), -1):
        facts = layers[first].segment
        if facts is None:
            break
        reach, ms = max(reach, facts.reach), ms + layers[first].forward_ms
        if facts.starts and reach <= last:
            out.append((first, *segment_bytes(layers, first, last + 1), ms))
        if not facts.joins:
            break
    return out


def segment_bytes(layers: Sequence[LayerProfile], first: int, end: int) -> tuple[int, int]:
    """Bytes segment ``[first, end)`` holds from its forward to its backward (its first layer's inputs, what the code
    after its last one saves) and the bytes its recompute rebuilds at once in backward (everything else its layers
    save)."""
    head, tail = layers[first].segment, layers[end - 1].segment
    held = head.input_bytes + tail.tail_bytes
    facts = [p.segment for p in layers[first:end]]
    if all(f.inner_storage_bytes is not None for f in facts):  # whole storages, each once: what is allocated
        return held, sum(f.inner_storage_bytes for f in facts) + sum(f.own_input_storage_bytes or 0 for f in facts[1:])
    saved = sum(p.saved_bytes for p in layers[first:end])
    return held, max(0, saved - head.own_input_bytes - tail.tail_bytes)
