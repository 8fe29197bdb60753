"""A small GPT in the nanoGPT/litgpt style that also covers a Llama-style block.

The model is a plain stack of identical :class:`Block` modules at ``GPT.blocks``. Each block takes and
returns only the hidden state (rotary tables are recomputed inside attention), so a strategy can move,
stream or recompute one block at a time without knowing anything else about the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lightning_vdnn.loss import chunked_cross_entropy

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")

_GPT_1B: dict[str, Any] = dict(
    vocab_size=32000, block_size=1024, n_layer=24, n_head=16, n_embd=2048, bias=True, tie_embeddings=False
)
_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt_tiny": dict(),
    "gpt_small": dict(n_layer=6, n_head=8, n_embd=256, block_size=256),
    "llama_tiny": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False),
    "gpt_1b": _GPT_1B,
    "gpt_deep": {**_GPT_1B, "n_layer": 96},
}


@dataclass(frozen=True)
class GPTConfig:
    """Every shape and architectural choice of :class:`GPT`; validated once, at construction."""

    vocab_size: int = 256
    block_size: int = 128  # maximum sequence length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"  # or "rmsnorm"
    mlp: str = "gelu"  # or "swiglu"
    pos: str = "learned"  # or "rope"
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1).")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("pos", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")
        if self.pos == "rope" and self.head_size % 2:
            raise ValueError(f"pos='rope' needs an even head size, got n_embd/n_head={self.head_size}.")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """4*d for GELU; for SwiGLU 8/3*d rounded up to a multiple of 64 (same FLOPs, as in Llama)."""
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 64 * math.ceil(int(8 * self.n_embd / 3) / 64)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named preset (see ``GPTConfig.names()``) with optional field overrides."""
        if name not in _CONFIGS:
            raise ValueError(f"Unknown GPT config {name!r}; valid names: {', '.join(cls.names())}.")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown GPTConfig fields {sorted(unknown)}.")
        return cls(**{**_CONFIGS[name], **overrides})

    @staticmethod
    def names() -> list[str]:
        return list(_CONFIGS)


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def _rope(x: Tensor) -> Tensor:
    """Rotary embedding (rotate-half, as litgpt/HF Llama) on ``x[B, H, T, D]``.

    The cos/sin tables are rebuilt on every call: they cost O(T*D), and keeping them out of the
    module state means a block works the same after ``.to()``, meta-device init or offload.
    """
    T, D = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))
    angles = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention through ``F.scaled_dot_product_attention`` (flash/SDPA kernels)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.rope, self.dropout = config.n_head, config.pos == "rope", config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = _rope(q), _rope(k)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """GPT-2 MLP: ``proj(gelu(fc(x)))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class SwiGLU(nn.Module):
    """Llama MLP: ``proj(silu(fc1(x)) * fc2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.fc2 = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.silu(self.fc1(x)) * self.fc2(x)))


class Block(nn.Module):
    """Pre-norm transformer block. ``forward(x) -> x`` with no other inputs, so it can run alone."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token embedding, ``n_layer`` identical blocks at ``self.blocks``, final norm and LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe: Optional[nn.Embedding] = (
            nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = _norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def reset_parameters(self) -> None:
        """nanoGPT init: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2*n_layer)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def forward(self, idx: Tensor) -> Tensor:
        """``idx[B, T]`` token ids -> ``logits[B, T, vocab_size]``."""
        return self.lm_head(self.hidden(idx))

    def loss(self, idx: Tensor, targets: Tensor, chunks: int = 1) -> Tensor:
        """Next-token cross-entropy of ``idx[B, T]`` against ``targets[B, T]``; ``chunks > 1`` makes the logits a
        chunk of tokens at a time (:func:`~lightning_vdnn.loss.chunked_cross_entropy`)."""
        return chunked_cross_entropy(self.hidden(idx), self.lm_head, targets, chunks)

    def hidden(self, idx: Tensor) -> Tensor:
        """``idx[B, T]`` token ids -> the final hidden states ``[B, T, n_embd]`` (after the last norm)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"Sequence length {T} exceeds block_size={self.config.block_size}.")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied matrix once). ``non_embedding`` drops the lookup-only tables
        (``wpe``, and ``wte`` when untied); a tied ``wte`` stays since it does the LM-head matmul."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Model FLOPs of one training step per token: 6*N for the matmuls (forward + backward)
        plus 12*L*d*T for attention scores (PaLM appendix B / nanoGPT ``estimate_mfu``)."""
        c, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * T
