"""Hugging Face models in the suite: an unmodified ``transformers.LlamaForCausalLM``, trained as ``gpt_1b`` is.

``hf_llama_1b`` has TinyLlama-1.1B's shape (22 blocks, width 2048, grouped-query attention with 4 key/value heads,
SwiGLU of 5632, vocab 32000), built from its config with fresh weights: nothing is downloaded. It checks that
the strategies train a model they were not written against, whose blocks take keyword arguments (rotary tables,
masks) and return what ``transformers`` returns, at the size the GPT rows are measured at.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.registry import ModelSize

#: TinyLlama-1.1B's architecture (``TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T``'s config.json), for
#: training: no key/value cache.
TINYLLAMA_1B = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, use_cache=False,
)
CONFIGS = {"tinyllama_1b": TINYLLAMA_1B}
ATTENTION = "sdpa"


def hf_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Next-token cross-entropy of the model's logits against ``y`` (already shifted, as ``gpt_loss``'s)."""
    x, y = batch
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def labels_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The model's own loss through ``labels=``: ``hf_loss``'s targets placed one later, since ``transformers``
    shifts labels itself (the last target is dropped: it would follow the sequence)."""
    x, y = batch
    labels = torch.cat([y[:, :1], y[:, :-1]], dim=1)  # position 0 is never a target after the shift
    return model(input_ids=x, labels=labels, use_cache=False).loss


def build_llama(size: ModelSize) -> nn.Module:
    """``LlamaForCausalLM`` in fp32 (cases cast as their users would) from ``CONFIGS[size.config]`` and overrides."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**CONFIGS[size.config], **dict(size.overrides)})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=ATTENTION)


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Model FLOPs of one training step per token, counted as ``GPT.flops_per_token`` counts them: 6*N over the
    parameters that do a matmul (the input embedding is a lookup, unless tied to the head) plus 12*L*d*T for the
    attention scores (grouped-query attention shares keys and values, not the score matmuls)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    if not c.tie_word_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, what checkpointing and FSDP2 wrap one by one."""
    return model.model.layers
