"""Data that needs no download: byte-level text from the Python standard library and synthetic images.

Both are deterministic for a given seed, so tests and benchmarks are reproducible on any machine,
including ones without network access.
"""

from __future__ import annotations

import os
import random
import sysconfig
from typing import Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_source_bytes(max_bytes: int) -> bytes:
    """The ``.py`` files of this interpreter's stdlib, sorted by path, concatenated up to ``max_bytes``."""
    root, chunks, total = sysconfig.get_paths()["stdlib"], [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)  # os.walk then visits in order
        for name in sorted(f for f in filenames if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, name), "rb") as fh:
                    data = fh.read(max_bytes - total)
            except OSError:
                continue
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                return b"".join(chunks)
    return b"".join(chunks)


def synthetic_text_bytes(n_bytes: int, seed: int = 0) -> bytes:
    """Python-like text from a seeded RNG: the fallback when no stdlib sources are installed.

    It has learnable structure (keywords, indentation, repeated names), so loss still falls.
    """
    rng, words = random.Random(seed), ["x", "y", "total", "value", "item", "count", "data", "result"]
    lines: list[str] = []
    size = 0
    while size < n_bytes:
        a, b, k = rng.choice(words), rng.choice(words), rng.randint(0, 99)
        templates = (f"def f_{k}({a}, {b}):\n", f"    {a} = {b} + {k}\n", f"    return {a} * {k}\n")
        line = rng.choice(templates + (f"for {a} in range({k}):\n",))
        lines.append(line)
        size += len(line)
    return "".join(lines).encode()[:n_bytes]


class TokenWindows(Dataset):
    """``(x, y)`` windows of ``seq_len`` tokens starting at fixed offsets; ``y`` is ``x`` shifted by one."""

    def __init__(self, tokens: Tensor, seq_len: int, starts: Tensor) -> None:
        self.tokens, self.seq_len, self.starts = tokens, seq_len, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        i = int(self.starts[index])
        chunk = self.tokens[i : i + self.seq_len + 1].long()
        return chunk[:-1], chunk[1:]


class TextDataModule(L.LightningDataModule):
    """Byte-level (vocab 256) language modelling on Python stdlib sources.

    Train: ``n_tokens // seq_len`` windows at random offsets drawn once from ``seed``.
    Val/test: the held-out tail (``val_fraction``) in consecutive windows.
    """

    vocab_size = 256

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 32,
        max_bytes: int = 2_000_000,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r} must be in (0, 1).")
        self.save_hyperparameters()
        self.seq_len, self.batch_size, self.max_bytes = seq_len, batch_size, max_bytes
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        self.train_set: Optional[TokenWindows] = None
        self.val_set: Optional[TokenWindows] = None

    def load_bytes(self) -> bytes:
        """Stdlib sources, or deterministic synthetic text if this Python ships none."""
        return stdlib_source_bytes(self.max_bytes) or synthetic_text_bytes(self.max_bytes, self.seed)

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        tokens = torch.frombuffer(bytearray(self.load_bytes()), dtype=torch.uint8)
        n_val = int(len(tokens) * self.val_fraction)
        train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
        if min(len(train), len(val)) <= self.seq_len + 1:
            raise ValueError(
                f"max_bytes={self.max_bytes} with val_fraction={self.val_fraction} leaves fewer than "
                f"seq_len+1={self.seq_len + 1} tokens in a split."
            )
        gen = torch.Generator().manual_seed(self.seed)
        train_starts = torch.randint(0, len(train) - self.seq_len, (len(train) // self.seq_len,), generator=gen)
        self.train_set = TokenWindows(train, self.seq_len, train_starts)
        self.val_set = TokenWindows(val, self.seq_len, torch.arange(0, len(val) - self.seq_len, self.seq_len))

    def _loader(self, shuffle: bool) -> DataLoader:
        self.setup()
        dataset = self.train_set if shuffle else self.val_set
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, generator=gen,
            num_workers=self.num_workers, drop_last=shuffle, persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)


class SyntheticImages(Dataset):
    """Learnable random images: item ``i`` draws a label and a noisy copy of that class's fixed random
    4x4 colour template, upsampled to ``image_size``. The same index always gives the same image."""

    def __init__(self, length: int, image_size: int, templates: Tensor, seed: int, offset: int = 0) -> None:
        self.length, self.image_size, self.templates = length, image_size, templates
        self.seed, self.offset = seed, offset

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index)
        label = torch.randint(len(self.templates), (), generator=gen)
        latent = self.templates[label] + 0.5 * torch.randn(3, 4, 4, generator=gen)
        size = (self.image_size, self.image_size)
        image = F.interpolate(latent[None], size=size, mode="bilinear", align_corners=False)[0]
        return image + 0.1 * torch.randn(3, *size, generator=gen), label


def _stack_channels_last(batch: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    images, labels = zip(*batch)
    return torch.stack(images).contiguous(memory_format=torch.channels_last), torch.stack(labels)


class SyntheticImageDataModule(L.LightningDataModule):
    """Seeded synthetic image classification; val/test/predict hold ``length // 4`` unseen images."""

    def __init__(
        self,
        image_size: int = 32,
        num_classes: int = 10,
        batch_size: int = 32,
        length: int = 512,
        seed: int = 0,
        channels_last: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.image_size, self.num_classes, self.batch_size = image_size, num_classes, batch_size
        self.length, self.seed, self.channels_last, self.num_workers = length, seed, channels_last, num_workers
        templates = torch.randn(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
        self.train_set = SyntheticImages(length, image_size, templates, seed)
        self.val_set = SyntheticImages(max(1, length // 4), image_size, templates, seed, offset=length)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            collate_fn=_stack_channels_last if self.channels_last else None,
            persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
