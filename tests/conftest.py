"""Shared test models: small enough for two CPU cores, shaped like the networks vDNN targets."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_vdnn  # noqa: F401  (registers the strategy names)
from lightning_vdnn.examples.tasks import LanguageModel


ROOT = Path(__file__).resolve().parents[1]


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment for a test's Python subprocess: this checkout's ``lightning_vdnn`` first on the path, not
    whichever copy is installed (a script's own directory, not the working directory, starts ``sys.path``)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run fastest so, and do not stall when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ResidualCNN(nn.Module):
    """Conv-BN-ReLU(inplace)-MaxPool, a residual add, dropout: the layer kinds vDNN's policies care about."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2)
        self.res = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                 nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(width * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = F.relu(x + self.res(x))
        return self.head(self.drop(x.flatten(1)))


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr = net, lr
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self.net(x), y))

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0]).argmax(-1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class TokenLM(L.LightningModule):
    """The package's GPT (tied embeddings, causal SDPA) as a LightningModule that records its losses."""

    def __init__(self, **overrides) -> None:
        super().__init__()
        from lightning_vdnn.examples.models import GPT, GPTConfig

        self.model = GPT(GPTConfig.from_name("gpt_tiny", **overrides))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)


def image_loader(n: int = 48, batch: int = 16, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=batch)


def token_loader(n: int = 24, batch: int = 8, seq: int = 64, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (n, seq + 1), generator=g)
    ds = torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:])
    return torch.utils.data.DataLoader(ds, batch_size=batch)


class RecordingGPT(LanguageModel):
    """The examples' ``gpt_tiny`` LightningModule, recording every training loss in ``losses``."""

    def __init__(self, warmup_steps: int = 2, max_steps: int = 6, **overrides) -> None:
        super().__init__("gpt_tiny", warmup_steps=warmup_steps, max_steps=max_steps, **overrides)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


def fit(module_fn, loader, strategy="auto", max_steps: int = 3, seed: int = 0, **trainer_kwargs):
    """Train a fresh module built under ``seed``; returns (module, trainer)."""
    L.seed_everything(seed, verbose=False)
    module = module_fn()
    kwargs = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(strategy=strategy, **kwargs)
    trainer.fit(module, loader)
    return module, trainer


def fit_on_gpu(module_fn, loader, strategy, max_steps: int, **trainer_kwargs):
    """:func:`fit` on the GPU from an emptied cache; returns (module, trainer, the peak of allocated bytes)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    module, trainer = fit(module_fn, loader, strategy, max_steps, accelerator="gpu", **trainer_kwargs)
    return module, trainer, torch.cuda.max_memory_allocated()


def made_storages(args: tuple, kwargs: dict | None, out: object) -> dict[int, torch.UntypedStorage]:
    """The storages an op (``__torch_dispatch__``'s ``func(*args, **kwargs)`` giving ``out``) made, by address: not
    views or aliases of its inputs."""
    from torch.utils._pytree import tree_leaves

    given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    return {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given}


def assert_same_params(a: nn.Module, b: nn.Module, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def cnn():
    return lambda: Classifier(ResidualCNN())


@pytest.fixture
def lm():
    return lambda: TokenLM(dropout=0.1)


def auto_against_plain(run, share: float, caplog_text=lambda: "", **auto_kwargs):
    """A GPU plan's test: ``run(strategy, steps)`` (:func:`fit_on_gpu`) in-GPU (6 steps), with every activation
    offloaded (1 step: the floor), and ``"auto"`` at the floor plus ``share`` of the way to the in-GPU peak (6
    steps); the auto run's losses and parameters against the in-GPU run's. Returns (auto trainer, budget)."""
    from lightning_vdnn import VDNNStrategy

    ref, _, plain_peak = run(VDNNStrategy("none", min_offload_bytes=0), 6)
    _, _, floor = run(VDNNStrategy("all", min_offload_bytes=0), 1)
    budget = floor + int(share * (plain_peak - floor))
    got, trainer, _ = run(VDNNStrategy("auto", min_offload_bytes=0, memory_budget=budget, **auto_kwargs), 6)
    report = trainer.strategy.memory_report()
    print(f"\nplain {plain_peak / 2**20:.1f} MiB, floor {floor / 2**20:.1f} MiB, budget {budget / 2**20:.1f} MiB\n"
          f"{[r.decision for r in report.layers]}\n{report}\n" + caplog_text())
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5)
    for p, q in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)
    for a, b in zip(got.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    return trainer, budget
