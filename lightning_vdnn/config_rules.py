"""The rules between :class:`~lightning_vdnn.VDNNConfig`'s fields: which options go together, and which
combinations are refused because they are not built.

``config.py`` checks each field alone (its type, bound, choices, syntax); this module checks the fields against
each other, once each field is known to be well formed. Each rule says which values clash and what to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_vdnn.config import VDNNConfig


def check(config: VDNNConfig) -> None:
    """Every cross-field rule, in the order a user reads the options.

    Raises:
        ValueError: options that do not go together; NotImplementedError: a combination not built yet.
    """
    _check_report_dir(config)
    _check_resident(config)
    _check_saved_blocks(config)
    if config.microbatches > 1 and not config.layer_streaming:
        raise ValueError(
            f"microbatches={config.microbatches} splits the batch inside each streamed block, so it needs layer "
            "streaming: use strategy='l2l' (or layer_streaming=True), or microbatches=1."
        )
    _check_chunks(config)
    _check_zero_offload(config)
    _check_budget(config)
    _check_host_update(config)


def _not_built(feature: str, argument: str) -> NotImplementedError:
    return NotImplementedError(
        f"{argument} needs {feature}, which this version of lightning_vdnn does not implement yet. "
        f"Remove {argument.split('=')[0]} (activation offload works without it)."
    )


def _check_report_dir(config: VDNNConfig) -> None:
    if config.report_dir is not None and config.fit_report is False:
        raise ValueError(f"report_dir={config.report_dir!r} is where fit_report saves its plot, and fit_report=False "
                         "saves none: drop report_dir, or set fit_report=True (None: follow enable_model_summary).")


def _check_host_update(config: VDNNConfig) -> None:
    if (config.host_optimizer != "auto" or config.host_state_dtype != "fp32") and config.layer_streaming is False:
        raise ValueError(f"host_optimizer={config.host_optimizer!r} and host_state_dtype={config.host_state_dtype!r} "
                         "choose how layer streaming updates its blocks on the host, and layer_streaming is "
                         "off. Set layer_streaming=True (strategy 'l2l'), or drop them.")


def _check_chunks(config: VDNNConfig) -> None:
    chunks, path = config.batch_chunks, config.chunk_layers
    if chunks == "auto":  # chunk_layers, if given, is the module auto chunking may split
        return
    if (chunks > 1) != (path is not None):
        raise ValueError(
            f"batch_chunks={chunks} and chunk_layers={path!r} go together: batch_chunks > 1 splits the batch "
            "of the module chunk_layers names. Give both, e.g. batch_chunks=4, chunk_layers='model.features', "
            "or neither.")
    if chunks > 1 and config.layer_streaming:
        raise ValueError(
            f"batch_chunks={chunks} with layer streaming: the streamed blocks split their batch with "
            f"microbatches={chunks} instead; use that, and batch_chunks=1.")


def _check_resident(config: VDNNConfig) -> None:
    value = config.resident_blocks
    if value and not config.layer_streaming:
        raise ValueError(
            f"resident_blocks={value!r} says how many blocks layer streaming leaves on the device, "
            "and layer_streaming is off (every block is resident). Set layer_streaming=True (strategy 'l2l') "
            "or drop resident_blocks."
        )
    if value == "auto" and config.zero_stage:
        raise NotImplementedError(
            f"resident_blocks='auto' with zero_stage={config.zero_stage}: choosing the resident blocks from a "
            "budget is built for one device (VDNNStrategy), where no other rank has to agree. Give "
            "resident_blocks a number of blocks, or train on one device."
        )


def _check_saved_blocks(config: VDNNConfig) -> None:
    value = config.saved_blocks
    if value is None:
        return
    if value == "auto":
        _check_auto_saved(config)
        return
    if not config.layer_streaming:
        raise ValueError(f"saved_blocks={value} says how many streamed blocks save their activations rather "
                         "than recompute them, and layer_streaming is off. Set layer_streaming=True (strategy "
                         "'l2l'), or drop saved_blocks.")
    if value and (config.activation_offload == "auto" or config.auto_resident):
        raise ValueError(
            f"saved_blocks={value} with activation_offload={config.activation_offload!r} and "
            f"resident_blocks={config.resident_blocks!r}: the budget's plan counts every streamed block as "
            "recomputed, so blocks that keep their activations could overflow it. Use a fixed policy ('all' "
            "moves them to the host, 'none' keeps them) with a fixed resident_blocks, or saved_blocks=0.")


def _check_auto_saved(config: VDNNConfig) -> None:
    """``saved_blocks="auto"`` counts saves kept on the device, alone: refuse what it would not count."""
    if not config.layer_streaming:
        raise ValueError("saved_blocks='auto' chooses how many streamed blocks keep their activations, and "
                         "layer_streaming is off. Set layer_streaming=True (strategy 'l2l'), or drop it.")
    if config.activation_offload != "none":
        raise ValueError(
            f"saved_blocks='auto' with activation_offload={config.activation_offload!r}: it fits the activations "
            "that saving blocks keep on the device, so it needs activation_offload='none' (as strategy='l2l'). "
            "With 'all' or 'conv' give saved_blocks a number of blocks.")
    if config.resident_blocks == "auto" or config.zero_stage:
        raise NotImplementedError(
            f"saved_blocks='auto' with resident_blocks={config.resident_blocks!r} and zero_stage="
            f"{config.zero_stage}: choosing the saving blocks is built for one device with a fixed number of "
            "resident blocks. Give resident_blocks a number (0 streams every block), or saved_blocks a number.")


def _check_budget(config: VDNNConfig) -> None:
    """A budget is fitted by the planner, which only ``"auto"`` (or a budget-chosen block count) runs."""
    if (config.memory_budget is None or config.activation_offload == "auto" or config.auto_resident
            or config.saved_blocks == "auto"):
        return
    fix = (f"resident_blocks='auto' (layer streaming then keeps on the device the most blocks that fit), not "
           f"{config.resident_blocks!r}" if config.layer_streaming and not config.zero_stage else "")
    raise ValueError(
        f"memory_budget={config.memory_budget!r} is what the planner fits the step into, and the planner runs "
        f"with activation_offload='auto', not {config.activation_offload!r}. Use activation_offload='auto'"
        + (f", or {fix}." if fix else ".")
    )


def _check_zero_offload(config: VDNNConfig) -> None:
    """Optimizer and parameter offload are DeepSpeed's (ZeRO-Offload, ZeRO-Infinity): they need its stages."""
    streaming, stage = config.layer_streaming, config.zero_stage
    if streaming and stage and (config.offload_optimizer or config.offload_params):
        flag = "offload_optimizer" if config.offload_optimizer else "offload_params"
        raise NotImplementedError(
            f"{flag}=True with layer_streaming=True and zero_stage={stage}: the streamed blocks' "
            "weights, gradients and optimizer state already live in host memory, partitioned across the "
            "ranks; moving the modules outside the blocks there too (DeepSpeed's offload) is not built. "
            f"Drop {flag}=True, or stream more of the model (layers=...)."
        )
    if config.offload_optimizer and not stage and not streaming:
        raise ValueError(
            "offload_optimizer=True keeps the optimizer state on the host through DeepSpeed ZeRO-Offload, which "
            "needs zero_stage=1, 2 or 3, not zero_stage=0. Set zero_stage (strategy='vdnn_zero2'), or use "
            "layer_streaming=True, which keeps its blocks' optimizer state on the host, and with "
            "offload_optimizer=True the other modules' too."
        )
    if config.offload_params and stage != 3:
        if streaming and not stage:
            raise _not_built("parameter offload of the non-streamed parameters", "offload_params=True")
        raise ValueError(
            f"offload_params=True needs zero_stage=3 (only ZeRO-3 shards, and so can offload, the "
            f"parameters), not zero_stage={stage}. Use zero_stage=3 (strategy='vdnn_zero3'), or "
            "offload_params=False to keep the parameters on the device."
        )


def refuse_chunks(config: VDNNConfig, entry: str) -> None:
    """Entry points other than ``VDNNStrategy`` do not chunk: refuse rather than ignore ``batch_chunks``."""
    if config.fixed_chunks > 1 or config.chunk_layers is not None:
        raise NotImplementedError(
            f"batch_chunks={config.batch_chunks!r} is built for VDNNStrategy (the Lightning Trainer on one device), "
            f"not for {entry}. Use Trainer(strategy=VDNNStrategy(batch_chunks=..., chunk_layers=...)), or "
            "batch_chunks=1.")


def refuse_auto_choices(config: VDNNConfig) -> None:
    """Entry points other than ``VDNNStrategy`` take a fixed number of resident blocks and saving blocks."""
    if config.saved_blocks == "auto":
        raise NotImplementedError(
            "saved_blocks='auto' chooses the saving blocks from the memory the first step leaves, which is "
            "built for the Lightning Trainer's VDNNStrategy. Here give saved_blocks a number of blocks.")
    if config.auto_resident:
        raise NotImplementedError(
            f"resident_blocks={config.resident_blocks!r} with memory_budget={config.memory_budget!r} chooses the "
            "resident blocks from the budget, which is built for the Lightning Trainer's VDNNStrategy (it "
            "switches blocks to the device between steps). Here give resident_blocks a number of blocks (0 "
            "streams every one).")
