"""The cases and models the suite knows, in tables, so that the runner validates names without importing torch."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class CaseSpec:
    """One way to train the model.

    Attributes:
        name: what ``--cases`` calls it.
        kind: ``"peer"`` (a raw PyTorch/DeepSpeed loop in ``peers.py``) or ``"lightning"`` (a ``Trainer`` run in
            ``lightning_cases.py``).
        about: one line for ``--help`` and the README.
        takes_budget: accepts ``memory_budget``, so ``--budget`` adds ``name@P%`` variants of it.
        data_parallel: runs on several devices (``--devices N``); a single-device strategy does not, and its
            row says so.
        accumulate: optimizer steps cover this many of the model's batches (the batch repeated along dim 0):
            gradient accumulation for a raw loop, layer-major ``microbatches`` for L2L. Compare its tokens/s
            (or images/s) with ``plain``; its step time covers ``accumulate`` batches.
        loss_chunks: the loss's logits made this many pieces of the tokens at a time (GPT:
            ``lightning_vdnn.chunked_cross_entropy``; a Hugging Face LM: its own loss through ``labels=``, which
            layer streaming with microbatches runs in chunks); 0 leaves the workload's loss alone.
    """

    name: str
    kind: str
    about: str
    takes_budget: bool = False
    data_parallel: bool = True
    accumulate: int = 1
    loss_chunks: int = 0


CASES: dict[str, CaseSpec] = {c.name: c for c in [
    CaseSpec("plain", "peer", "raw PyTorch loop, everything on the GPU (the baseline of every ratio); DDP on N"),
    CaseSpec("lightning_plain", "lightning", "Trainer(strategy='auto'): Lightning's overhead against 'plain'"),
    CaseSpec("checkpoint", "peer", "torch.utils.checkpoint per block / conv stage, non-reentrant"),
    CaseSpec("checkpoint_sequential", "peer", "checkpoint_sequential's sqrt(n) equal runs over VGG's trunk (leaf "
             "modules) or GPT's blocks, each under a non-reentrant checkpoint (no run starts at an in-place ReLU)"),
    CaseSpec("hf_checkpoint", "peer", "transformers' own per-layer activation checkpointing "
             "(model.gradient_checkpointing_enable(), non-reentrant; Hugging Face models)"),
    CaseSpec("save_on_cpu", "peer", "torch.autograd.graph.save_on_cpu(pin_memory=True) around the forward"),
    CaseSpec("zero3_offload", "peer", "DeepSpeed ZeRO-3, parameters and optimizer offloaded to pinned CPU"),
    CaseSpec("zero2_offload", "peer", "DeepSpeed ZeRO-2, optimizer offloaded to pinned CPU"),
    CaseSpec("fsdp2_offload", "peer", "FSDP2 fully_shard per block + root with CPUOffloadPolicy"),
    CaseSpec("vdnn_all", "lightning", "Trainer(strategy='vdnn_all'): offload every saved activation",
             data_parallel=False),
    CaseSpec("vdnn_conv", "lightning", "Trainer(strategy='vdnn_conv'): offload Conv/Linear/attention inputs",
             data_parallel=False),
    CaseSpec("vdnn", "lightning", "Trainer(strategy='vdnn'): the planner picks what to offload (and, by "
             "batch_chunks='auto', runs the conv trunk in batch chunks where the budget is below the floor)",
             takes_budget=True, data_parallel=False),
    CaseSpec("vdnn_lean", "lightning", "vdnn with lean_activations=True: kept layers may make their GELU/SiLU "
             "outputs again in backward instead of holding them", takes_budget=True, data_parallel=False),
    CaseSpec("vdnn_all_c4", "lightning", "vdnn_all with the model's conv trunk run in 4 batch chunks "
             "(batch_chunks=4, chunk_layers='model.features'; VGG)", data_parallel=False),
    CaseSpec("vdnn_c4", "lightning", "vdnn (the planner) with the conv trunk in 4 batch chunks (VGG)",
             takes_budget=True, data_parallel=False),
    CaseSpec("vdnn_none", "lightning", "Trainer(strategy='vdnn_none'): hooks installed, nothing moved",
             data_parallel=False),
    CaseSpec("l2l", "lightning", "Trainer(strategy='l2l'): L2L layer streaming (l2l@P%: the budget picks how "
             "many blocks stay resident)", takes_budget=True,
             data_parallel=False),
    CaseSpec("plain_accum8", "peer", "raw loop, 8 batches of gradient accumulation per optimizer step",
             data_parallel=False, accumulate=8),
    CaseSpec("l2l_mb8", "lightning", "L2L, 8 batches per step as layer-major microbatches (microbatches=8)",
             data_parallel=False, accumulate=8),
    CaseSpec("l2l_mb8_keep8", "lightning", "l2l_mb8 with 8 streamed blocks keeping their activations on the GPU "
             "instead of recomputing them (saved_blocks=8, activation_offload='none')", data_parallel=False,
             accumulate=8),
    CaseSpec("l2l_mb8_keep12", "lightning", "l2l_mb8 with 12 streamed blocks keeping their activations on the GPU "
             "(saved_blocks=12)", data_parallel=False, accumulate=8),
    CaseSpec("l2l_mb8_auto", "lightning", "l2l_mb8 with as many streamed blocks keeping their activations on the "
             "GPU as fit it (saved_blocks='auto')", data_parallel=False, accumulate=8),
    CaseSpec("l2l_mb8_off4", "lightning", "l2l_mb8 with 4 streamed blocks moving their activations to the host "
             "instead of recomputing them (saved_blocks=4, activation_offload='all', 8 GiB in flight)",
             data_parallel=False, accumulate=8),
    CaseSpec("l2l_mb8_off8", "lightning", "l2l_mb8 with 8 streamed blocks moving their activations to the host "
             "(saved_blocks=8, activation_offload='all', 8 GiB in flight)", data_parallel=False, accumulate=8),
    CaseSpec("l2l_all", "lightning", "l2l with every streamed block's activations moved to the host instead of "
             "recomputed (activation_offload='all')", data_parallel=False),
    CaseSpec("l2l_r8", "lightning", "L2L with the first 8 blocks resident on the GPU (resident_blocks=8)",
             data_parallel=False),
    CaseSpec("l2l_r16", "lightning", "L2L with the first 16 blocks resident on the GPU (resident_blocks=16)",
             data_parallel=False),
    CaseSpec("l2l_lean", "lightning", "L2L at its least device memory: block inputs offloaded, internals "
             "recomputed (activation_offload='all', saved_blocks=0), the head's and embeddings' optimizer on the "
             "host (offload_optimizer=True), "
             "the loss in 8 chunks (GPT)", data_parallel=False, loss_chunks=8),
    CaseSpec("l2l_torch", "lightning", "l2l with the blocks' host Adam on torch's fused CPU kernel "
             "(host_optimizer='torch'; 'l2l' times it against DeepSpeed's at start-up)", data_parallel=False),
    CaseSpec("l2l_ds", "lightning", "l2l with the blocks' host Adam on DeepSpeed's CPU Adam kernel "
             "(host_optimizer='deepspeed')", data_parallel=False),
    CaseSpec("l2l_bf16s", "lightning", "l2l with the lean host state: Adam's moments and the blocks' gradients in "
             "bf16 in host memory, fp32 master weights (host_state_dtype='bf16')", data_parallel=False),
    CaseSpec("l2l_bf16g", "lightning", "l2l_bf16s on torch's fused CPU Adam kernel: against l2l_torch, what bf16 "
             "moments and gradients change (host_optimizer='torch', host_state_dtype='bf16')", data_parallel=False),
    CaseSpec("l2l_ds_bf16s", "lightning", "l2l_bf16s on DeepSpeed's CPU Adam kernel", data_parallel=False),
    CaseSpec("l2l_native", "lightning", "l2l with the blocks' host Adam on the native one-pass kernel, update and "
             "bf16 copy in one C++ pass (host_optimizer='native'; 'l2l' times it against torch's at start-up)",
             data_parallel=False),
    CaseSpec("l2l_native_bf16s", "lightning", "l2l_bf16s on the native one-pass kernel: bf16 moments and gradients "
             "widened, updated and rounded in its one pass (host_optimizer='native', host_state_dtype='bf16')",
             data_parallel=False),
    CaseSpec("l2l_mb8_lean", "lightning", "l2l_mb8 at its least device memory: l2l_lean's settings (block inputs "
             "to the host, internals recomputed, the head's and embeddings' optimizer on the host) with the head and "
             "loss in 8 chunks of tokens (GPT: GPT.loss; Hugging Face: labels=, chunked by the streamer)",
             data_parallel=False, accumulate=8, loss_chunks=8),
    CaseSpec("l2l_zero", "lightning", "Trainer(strategy='l2l_zero'): L2L on every rank, each rank keeping and "
             "updating 1/N of the blocks' host state (DDP for the rest)"),
    CaseSpec("vdnn_zero2", "lightning", "Trainer(strategy='vdnn_zero2'): vDNN + DeepSpeed ZeRO-2",
             takes_budget=True),
    CaseSpec("vdnn_zero3", "lightning", "Trainer(strategy='vdnn_zero3'): vDNN + DeepSpeed ZeRO-3",
             takes_budget=True),
]}


def devices_status(spec: CaseSpec, devices: int) -> Optional[str]:
    """The row's status when ``spec`` cannot run on ``devices`` devices; None when it can."""
    if devices > 1 and not spec.data_parallel:
        return (f"n/a: single-device strategy ('{spec.name}' trains on one device; run it with --devices 1, or "
                "vdnn_zero2/vdnn_zero3 for data parallel)")
    return None


@dataclass(frozen=True)
class ModelSize:
    """A model of the suite: a named config of ``lightning_vdnn.examples.models`` (or of ``hf_workloads.CONFIGS``),
    with overrides, and its batch."""

    family: str  # "gpt", "vgg" or "hf_llama" (a transformers LlamaForCausalLM)
    config: str
    batch: int
    seq_len: int = 0  # language models only
    overrides: tuple[tuple[str, int], ...] = ()  # GPTConfig/VGGConfig fields, or LlamaConfig's for hf_llama


SIZES: dict[str, ModelSize] = {
    "gpt_1b": ModelSize("gpt", "gpt_1b", 8, 1024),
    "gpt_deep": ModelSize("gpt", "gpt_deep", 8, 1024),
    "vgg16": ModelSize("vgg", "vgg16", 256),
    "gpt_tiny": ModelSize("gpt", "gpt_tiny", 2, 64),
    "gpt_deep_tiny": ModelSize("gpt", "gpt_tiny", 2, 64, overrides=(("n_layer", 16),)),
    "vgg_tiny": ModelSize("vgg", "vgg_tiny", 4),
    "hf_llama_1b": ModelSize("hf_llama", "tinyllama_1b", 8, 1024),
    "hf_llama_tiny": ModelSize("hf_llama", "tinyllama_1b", 2, 64, overrides=(
        ("num_hidden_layers", 4), ("hidden_size", 64), ("intermediate_size", 176), ("num_attention_heads", 4),
        ("num_key_value_heads", 2), ("vocab_size", 256))),
}
#: ``--tiny`` maps each model to its CPU-sized stand-in.
TINY = {"gpt_1b": "gpt_tiny", "gpt_deep": "gpt_deep_tiny", "vgg16": "vgg_tiny",
        "gpt_tiny": "gpt_tiny", "gpt_deep_tiny": "gpt_deep_tiny", "vgg_tiny": "vgg_tiny",
        "hf_llama_1b": "hf_llama_tiny", "hf_llama_tiny": "hf_llama_tiny"}

BASELINE = "plain"
_BUDGET_RE = re.compile(r"^([0-9]*\.?[0-9]+)%$")


def parse_percent(text: str) -> float:
    """``"50%"`` -> 0.5; raises ValueError naming the bad value."""
    m = _BUDGET_RE.match(text.strip())
    if not m or not 0 < float(m.group(1)) <= 100:
        raise ValueError(f"budget {text!r} is not a percentage in (0%, 100%] of plain's peak, e.g. '50%'.")
    return float(m.group(1)) / 100


#: ``l2l_mixR_sS[_kK]``: R blocks resident (the first K keeping their activations, the rest recomputing), S of the
#: streamed ones keeping theirs on the device: hand-set points of what ``strategy="vdnn"`` chooses under a budget.
#: ``vdnn_mix...``: the same with the activation planner placing the activations within ``@P%``.
MIXED = re.compile(r"^(l2l|vdnn)_mix(\d+)_s(\d+)(?:_k(\d+))?$")


def _spec(base: str) -> CaseSpec:
    if mixed := MIXED.match(base):
        return CaseSpec(base, "lightning", "L2L, hand-set resident, recomputing and saving blocks",
                        data_parallel=False, takes_budget=mixed[1] == "vdnn")
    if base not in CASES:
        raise ValueError(f"unknown case {base!r}; valid cases: {', '.join(CASES)}, l2l_mixR_sS[_kK], vdnn_mixR_sS[_kK] "
                         f"(and NAME@P% for {', '.join(n for n, c in CASES.items() if c.takes_budget)}).")
    return CASES[base]


def split_case(name: str) -> tuple[CaseSpec, Optional[float]]:
    """``"vdnn@50%"`` -> (spec of ``vdnn``, 0.5); ``"plain"`` -> (spec of ``plain``, None).

    Raises:
        ValueError: an unknown case (the message lists the valid ones) or a budget on a case that takes none.
    """
    base, _, budget = name.partition("@")
    spec = _spec(base)
    if not budget:
        return spec, None
    if not spec.takes_budget:
        raise ValueError(f"case {base!r} takes no memory budget; only "
                         f"{', '.join(n for n, c in CASES.items() if c.takes_budget)} do.")
    return spec, parse_percent(budget)


def expand(names: list[str], budgets: list[float]) -> list[str]:
    """Validated case list, baseline first, each budget-taking case followed by its ``@P%`` variants."""
    for name in names:
        split_case(name)
    ordered = [BASELINE] + [n for n in dict.fromkeys(names) if n != BASELINE]
    out = []
    for name in ordered:
        out.append(name)
        if "@" not in name and _spec(name).takes_budget:
            out += [f"{name}@{_percent_label(b)}" for b in budgets if f"{name}@{_percent_label(b)}" not in ordered]
    return out


def _percent_label(fraction: float) -> str:
    return f"{fraction * 100:g}%"
