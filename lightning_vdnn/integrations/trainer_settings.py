"""What a Lightning Trainer's settings mean for layer streaming, read at ``setup`` by each strategy that streams
(``VDNNStrategy``, ``L2LZeroStrategy``): when the blocks' host updates may start, when a step must wait for them,
and what bf16 host gradients refuse."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.precision import Precision

from lightning_vdnn.streaming.bf16_grads import clipping_refused
from lightning_vdnn.streaming.streamer import LayerStreamer


def follow_trainer(streamer: LayerStreamer, trainer: Any, precision: Precision) -> None:
    """Set ``streamer``'s update timing from the Trainer: during backward unless something rewrites gradients
    after it; waited for at each step where a callback reads the weights right after it."""
    streamer.set_eager(not changes_grads_after_backward(trainer, precision))
    streamer.wait_after_step = reads_weights_after_step(trainer)


def check_bf16_grads(trainer: Any) -> None:
    """bf16 host gradients (``streaming/bf16_grads.py``) are set once per step and are not ``p.grad``: refuse what
    would add to them or read ``p.grad`` for them, before the first step rather than in it."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if trainer.accumulate_grad_batches > 1:
        raise ValueError(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches} with host_state_dtype='bf16': the blocks' "
            "host gradients are bf16, and summing batches into them would round the sum to bf16 at every batch. "
            f"Use microbatches={trainer.accumulate_grad_batches} (the chunks are summed in fp32 on the device) with "
            "accumulate_grad_batches=1, or host_state_dtype='fp32'.")
    if trainer.gradient_clip_val or is_overridden("configure_gradient_clipping", trainer.lightning_module,
                                                  LightningModule):
        raise clipping_refused("gradient clipping", drop="gradient_clip_val (or configure_gradient_clipping)")


def changes_grads_after_backward(trainer: Any, precision: Precision) -> bool:
    """Whether something may still rewrite gradients between backward and the step (clipping, a loss
    scaler): then layer streaming queues block updates at the step instead of during backward."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.utilities.model_helpers import is_overridden

    module = trainer.lightning_module
    return bool(trainer.gradient_clip_val) or getattr(precision, "scaler", None) is not None or (
        is_overridden("configure_gradient_clipping", module, LightningModule))


def reads_weights_after_step(trainer: Any) -> bool:
    """Whether a callback reads the weights right after each optimizer step (Lightning's weight averaging: SWA,
    EMA): then the blocks' host updates are waited for at the step, not as the next forward reaches each block."""
    from lightning.pytorch import callbacks

    kinds = tuple(getattr(callbacks, name) for name in ("StochasticWeightAveraging", "WeightAveraging")
                  if hasattr(callbacks, name))
    return any(isinstance(cb, kinds) for cb in trainer.callbacks)
