"""Checkpoints that are either the old file or the new one, never half of either.

Lightning's own writer serialises the whole checkpoint into memory first (twice the host memory of the state,
which for a model that does not fit a GPU is a lot) and does not fsync. This one streams ``torch.save`` into
a temporary file beside the target, fsyncs it, renames it over the target and fsyncs the directory: a kill
or power loss at any moment leaves the previous checkpoint or the complete new one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save(obj, path)`` through a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` writing local checkpoints atomically (remote paths: Lightning's writer)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        protocol = get_filesystem(path).protocol
        local = "file" in (protocol if isinstance(protocol, tuple) else (protocol,))
        if storage_options is not None or not local:
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
