"""The end of layer streaming: the blocks' host buffers become ordinary tensors again, one pinned chunk at a time.

At the largest models the host holds the blocks' state with little to spare, so the end of streaming must not
hold it twice: the parameters (and fp32 gradients) living in one chunk of a :class:`PinnedArena` are cloned
into ordinary memory, then that chunk is unlocked and dropped, which returns it to the OS at once
(``streaming/pinned_arena.py``), then the next. Chunks that need the fewest bytes copied go first: those of the
weights' compute-dtype copies (dropped, nothing copied) give their memory back before any clone is made. So the
extra host memory at any point is at most one chunk's clones (``PinnedArena.MAX_CHUNK``). A clone, not the chunk
itself handed over: ``torch.save`` of a view writes its whole storage, so a checkpoint written after ``fit``
would carry the chunk (up to 8 GiB) for each parameter.
"""

from __future__ import annotations

from typing import Iterable

from lightning_vdnn.streaming.host_state import HostBlock
from lightning_vdnn.streaming.pinned_arena import PinnedArena


def release_blocks(blocks: Iterable[HostBlock], arenas: Iterable[PinnedArena]) -> None:
    """Ordinary host storage for every block's parameters (and fp32 gradients), chunk by chunk as the module
    docstring says; buffers in no arena's chunk (pageable ones) are released block by block afterwards. Nothing
    may still copy from or to the buffers (the streamer synchronized)."""
    blocks, arenas = list(blocks), list(arenas)
    held: dict[tuple[int, int], list[tuple[HostBlock, str]]] = {}
    for block in blocks:
        for part, buffer in block.buffers().items():
            for a, arena in enumerate(arenas):
                k = arena.chunk_of(buffer)
                if k is not None:
                    held.setdefault((a, k), []).append((block, part))
                    break
    chunks = [(a, k) for a, arena in enumerate(arenas) for k in arena.live()]
    cloned = {chunk: sum(b.kept_bytes(part) for b, part in held.get(chunk, [])) for chunk in chunks}
    for a, k in sorted(chunks, key=cloned.__getitem__):
        for block, part in held.get((a, k), []):
            block.release_part(part)
        arenas[a].free(k)
    for block in blocks:
        block.release()
