"""The last step's gradients, freed as the next step begins instead of after its forward.

Lightning's automatic optimization zeroes gradients after ``training_step`` returns, just before backward, so
the last step's gradients stay allocated through the whole next forward, on top of its activations: 4 bytes per
fp32 parameter (gpt_1b: 5.4 GB of a 34 GB step). When nothing the user wrote can tell the difference, they are
freed when the batch starts, by setting ``p.grad = None`` on the optimizers' parameters: what torch's
``Optimizer.zero_grad()``, which Lightning calls a moment later, does. The user's optimizer is not called, so
Lightning's ``zero_grad`` stays the step's only one, as in plain training (a subclass may count or log them).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim import Optimizer

import lightning.pytorch as pl


def frees_early(trainer: Any) -> bool:
    """Whether freeing the gradients at the batch's start changes nothing the user can see: automatic
    optimization, no hook of the user's that runs between that moment and Lightning's ``zero_grad``
    (``optimizer_zero_grad``, ``on_before_zero_grad``, in the module or a callback) or that zeroes otherwise,
    and optimizers whose ``zero_grad`` is torch's own (what a subclass's does, e.g. keep some gradients, is
    unknown: it runs where Lightning calls it, alone). A ``training_step`` that reads ``p.grad`` would see
    ``None``: the step's gradients are made in its backward."""
    module = trainer.lightning_module
    if module is None or not module.automatic_optimization:
        return False
    if any(is_overridden(hook, module, pl.LightningModule) for hook in ("optimizer_zero_grad", "on_before_zero_grad")):
        return False
    if any(is_overridden("on_before_zero_grad", cb, pl.Callback) for cb in trainer.callbacks):
        return False
    return all(type(optimizer).zero_grad is Optimizer.zero_grad for optimizer in trainer.optimizers)


def free_stale_grads(trainer: Any, batch_idx: int) -> bool:
    """At the start of batch ``batch_idx``: set the optimizers' gradients to None now if Lightning will zero
    them in this batch (the first of an accumulation window) and :func:`frees_early`; returns whether it did.

    Layer streaming wraps ``zero_grad`` on the instance (``integrations/adapters/torch.py``); with
    ``set_to_none`` on one device the wrapper adds nothing to this (a block's ``p.grad`` is its record), and its
    queued updates hold their own references to the gradients they read."""
    if batch_idx % trainer.accumulate_grad_batches or not frees_early(trainer):
        return False
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
    return True
