"""Checkpoints that are either the old file or the new one, never half of either.

Lightning's own writer serialises the whole checkpoint into memory first (twice the host memory of the state,
which for a model that does not fit a GPU is a lot) and does not fsync. This one streams ``torch.save`` into
a temporary file beside the target, fsyncs it, renames it over the target and fsyncs the directory: a kill
or power loss at any moment leaves the previous checkpoint or the complete new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override


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
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def version_dir(path: _PATH, tag: str) -> Path:
    """Where a directory checkpoint (DeepSpeed's shards) for ``path`` is written before :func:`publish_dir`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}")


def publish_dir(written: Path, path: _PATH, tag: str) -> None:
    """Make ``path`` the complete directory checkpoint ``written`` in one atomic step, then drop the old one.

    A directory cannot be renamed over a non-empty one, so ``path`` is a symlink to a versioned directory
    beside it, swapped by ``os.replace`` of a fresh link: a kill at any moment leaves ``path`` at the old
    checkpoint or the new one. Every file is fsynced first (DeepSpeed does not). A ``path`` that is a real
    directory (from an older, in-place save) is moved aside first: only that one switch is not atomic.
    """
    path = Path(path)
    for file in written.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(written)
    old = None
    if path.is_symlink():
        old = path.parent / os.readlink(path)
    elif path.exists():
        old = path.with_name(f".{path.name}.replaced-{tag}")
        os.replace(path, old)
    link = path.with_name(f".{path.name}.link-{tag}")
    link.unlink(missing_ok=True)
    os.symlink(written.name, link)
    os.replace(link, path)
    _fsync_dir(path.parent)
    if old is not None and old.resolve() != written.resolve():
        shutil.rmtree(old, ignore_errors=True)
    for stale in path.parent.glob(version_dir(path, "*").name):  # left by saves killed before publishing
        if stale.is_symlink():
            stale.unlink(missing_ok=True)
        elif stale.resolve() != written.resolve():
            shutil.rmtree(stale, ignore_errors=True)


def remove_published(path: _PATH) -> bool:
    """Remove a checkpoint :func:`publish_dir` made (the link and what it points to); False if ``path`` is not
    one, for the caller's own removal."""
    path = Path(path)
    if not path.is_symlink():
        return False
    target = path.parent / os.readlink(path)
    path.unlink()
    shutil.rmtree(target, ignore_errors=True)
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` writing local checkpoints atomically (remote paths: Lightning's writer)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        protocol = get_filesystem(path).protocol
        local = "file" in (protocol if isinstance(protocol, tuple) else (protocol,))
        if storage_options is not None or not local:
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_torch_save(checkpoint, path)


class AtomicByDefault:
    """Mixin, before a Lightning ``Strategy`` in the bases: its checkpoints are written by
    :class:`AtomicCheckpointIO` unless the user plugged in their own ``CheckpointIO``."""

    _checkpoint_io: Optional[Any]

    @property
    def checkpoint_io(self) -> Any:
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: Optional[Any]) -> None:
        self._checkpoint_io = io
