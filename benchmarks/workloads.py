"""The models of the suite, each with its fixed synthetic batch, loss, optimizer and FLOP count.

Every case, raw loop or Lightning, trains the nn.Module built here on the batch built here, so that the
cases differ only in how they train it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.registry import SIZES, ModelSize

SEED = 0
GPT_LR = 1e-4
SGD_LR, SGD_MOMENTUM = 1e-2, 0.9


@dataclass
class Workload:
    """A model (on the CPU, fp32; each case moves it its own way), its batch (on the device) and how to train.

    ``loss(model, batch)`` runs forward and returns the scalar loss; mixed precision is the case's business.
    ``optimizer(params, state_device)`` builds the torch optimizer (fused where its state is on CUDA);
    ``ds_optimizer`` is the same optimizer as a DeepSpeed config entry.
    """

    name: str
    family: str
    model: nn.Module
    batch: tuple[Tensor, Tensor]
    loss: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]
    optimizer: Callable[[object, torch.device], torch.optim.Optimizer]
    ds_optimizer: dict
    items_per_step: int
    unit: str
    flops_per_step: float


def gpt_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def vgg_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def _adamw(params, state_device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=GPT_LR, fused=state_device.type == "cuda")


def _sgd(params, state_device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=SGD_LR, momentum=SGD_MOMENTUM)


def flat_weights(model: nn.Module) -> None:
    """DeepSpeed and FSDP2 flatten parameters and refuse channels_last ones: VGG's weights go back to NCHW
    (its input stays channels_last, so the convolutions still run channels_last)."""
    model.to(memory_format=torch.contiguous_format)


def chunked_loss(w: Workload, chunks: int) -> Workload:
    """``w`` with its loss made ``chunks`` pieces of the tokens at a time: the GPT's ``GPT.loss``; a Hugging Face
    LM's own loss (``labels=``), which layer streaming with microbatches runs in chunks (``streaming/chunked_head.py``;
    elsewhere it is the whole-batch loss)."""
    if w.family == "hf_llama":
        from benchmarks import hf_workloads

        return dataclasses.replace(w, loss=hf_workloads.labels_loss)
    if w.family != "gpt":
        raise NotImplementedError(f"a loss in chunks is for the language models; {w.name} is a {w.family}.")
    return dataclasses.replace(w, loss=lambda model, batch: model.loss(*batch, chunks))


def repeated(w: Workload, k: int) -> Workload:
    """``w`` with its batch repeated ``k`` times along dim 0: the global batch of ``k`` accumulated batches."""
    if k == 1:
        return w
    batch = tuple(t.repeat(k, *([1] * (t.dim() - 1))) for t in w.batch)
    return dataclasses.replace(w, batch=batch, items_per_step=w.items_per_step * k,
                               flops_per_step=w.flops_per_step * k)


def compiled(w: Workload) -> Workload:
    """``w`` with its model compiled as torch recommends for repeated blocks: each block by itself
    (``block.compile()``, GPT's blocks, a Llama's decoder layers), the module tree unchanged, so every case (layer
    streaming included) finds the blocks where it looks; VGG, which has none, whole (``model.compile()``)."""
    if w.family == "gpt":
        units = list(w.model.blocks)
    elif w.family == "hf_llama":
        from benchmarks import hf_workloads

        units = list(hf_workloads.blocks(w.model))
    else:
        units = [w.model]
    for unit in units:
        unit.compile()
    return w


def _hf_llama(name: str, size: ModelSize, gen: torch.Generator, device: torch.device) -> Workload:
    """A ``transformers`` Llama (``hf_workloads.py``), with the GPT models' batch and optimizer."""
    from benchmarks import hf_workloads

    model = hf_workloads.build_llama(size)
    shape = (size.batch, size.seq_len)
    x, y = (torch.randint(model.config.vocab_size, shape, generator=gen).to(device) for _ in range(2))
    return Workload(name, "hf_llama", model, (x, y), hf_workloads.hf_loss, _adamw,
                    {"type": "AdamW", "params": {"lr": GPT_LR}}, size.batch * size.seq_len, "tokens",
                    float(hf_workloads.flops_per_token(model, size.seq_len)) * size.batch * size.seq_len)


def build(name: str, device: torch.device) -> Workload:
    """The workload ``name`` (a key of ``SIZES``) with its batch on ``device``; seeded, so every case is alike."""
    from lightning_vdnn.examples.models import GPT, VGG, GPTConfig, VGGConfig

    size = SIZES[name]
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    if size.family == "gpt":
        model = GPT(GPTConfig.from_name(size.config, **dict(size.overrides)))
        shape = (size.batch, size.seq_len)
        x, y = (torch.randint(model.config.vocab_size, shape, generator=gen).to(device) for _ in range(2))
        return Workload(name, "gpt", model, (x, y), gpt_loss, _adamw, {"type": "AdamW", "params": {"lr": GPT_LR}},
                        size.batch * size.seq_len, "tokens",
                        float(model.flops_per_token(size.seq_len)) * size.batch * size.seq_len)
    if size.family == "hf_llama":
        return _hf_llama(name, size, gen, device)
    cfg = VGGConfig.from_name(size.config, **dict(size.overrides))
    model = VGG(cfg).to(memory_format=torch.channels_last)
    images = torch.randn(size.batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    labels = torch.randint(cfg.num_classes, (size.batch,), generator=gen)
    images = images.to(device, memory_format=torch.channels_last)
    return Workload(name, "vgg", model, (images, labels.to(device)), vgg_loss, _sgd,
                    {"type": "SGD", "params": {"lr": SGD_LR, "momentum": SGD_MOMENTUM}}, size.batch, "images",
                    float(model.flops_per_image()) * size.batch)
