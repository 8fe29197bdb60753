"""LightningModules shared by recipes, benchmarks and tests.

The network sits at ``self.model`` (so a GPT's blocks are at ``model.blocks`` from the LightningModule),
and the modules know nothing about memory: offload and streaming are entirely the strategy's job.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_vdnn.examples.models import GPT, VGG, GPTConfig, VGGConfig


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings (dim >= 2), not biases or norm gains. ``named_parameters``
    yields a tied weight once, so the shared embedding/LM-head matrix is not listed twice."""
    params = [p for _, p in module.named_parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _first(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class NextTokenTask(L.LightningModule):
    """What every next-token LightningModule here shares: the loss of ``(x, y)`` batches logged per stage, greedy
    prediction and AdamW with warm-up + cosine stepped every batch. Subclasses build ``self.model``, save their
    hyper-parameters (``lr``, ``weight_decay``, ``betas``, ``warmup_steps``, ``max_steps``, ``min_lr_ratio``) and
    define ``forward(idx) -> logits`` and ``_loss(batch)``."""

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("test/loss", loss, sync_dist=True)
        return loss

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Greedy next-token ids ``[B, T]`` for each position of ``x`` (or of ``(x, y)``'s ``x``)."""
        return self(_first(batch)).argmax(dim=-1)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas))
        schedule = warmup_cosine(hp.warmup_steps, hp.max_steps, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LanguageModel(NextTokenTask):
    """Next-token prediction with :class:`GPT`; AdamW with warm-up + cosine, stepped every batch."""

    def __init__(
        self,
        model: Union[str, GPTConfig] = "gpt_tiny",
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        max_steps: int = 1000,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
        loss_chunks: int = 1,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if isinstance(loss_chunks, bool) or not isinstance(loss_chunks, int) or loss_chunks < 1:
            raise ValueError(f"loss_chunks={loss_chunks!r} must be a positive integer: the number of pieces the "
                             "head's logits are made in (1: all at once).")
        self.save_hyperparameters()
        self.loss_chunks = loss_chunks
        if overrides and not isinstance(model, str):
            raise ValueError(f"Field overrides {sorted(overrides)} need a config name, not a GPTConfig.")
        self.config = GPTConfig.from_name(model, **overrides) if isinstance(model, str) else model
        self.model = GPT(self.config)
        if compile:  # per block, so the module tree (and ``model.blocks``) is unchanged
            for block in self.model.blocks:
                block.compile()

    @override
    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return self.model.loss(x, y, self.loss_chunks)



class ImageClassifier(L.LightningModule):
    """Image classification with :class:`VGG`; SGD with momentum, as in the VGG and vDNN papers."""

    def __init__(
        self,
        model: Union[str, VGGConfig] = "vgg_tiny",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        channels_last: bool = False,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if overrides and not isinstance(model, str):
            raise ValueError(f"Field overrides {sorted(overrides)} need a config name, not a VGGConfig.")
        self.config = VGGConfig.from_name(model, **overrides) if isinstance(model, str) else model
        self.model = VGG(self.config)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.contiguous(memory_format=self.memory_format))

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=-1) == y).float().mean()
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=sync)
        self.log(f"{stage}/acc", acc, prog_bar=stage != "test", sync_dist=sync)
        return loss

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class ids ``[B]``."""
        return self(_first(batch)).argmax(dim=-1)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay)
        return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
