"""vDNN activation offload for Hugging Face Accelerate: ``prepare(accelerator, model, optimizer, ...)``.

Accelerate's own ``prepare`` wraps ``model.forward`` (autocast, fp32 outputs) and leaves ``backward`` to
``accelerator.backward``; this does the same: the prepared model's forward runs under the offloader's
capture, and ``accelerator.backward`` closes the pass. ``accelerator.unwrap_model(model,
keep_fp32_wrapper=False)`` removes this forward wrapper along with Accelerate's.

With ``layer_streaming=True`` the models' blocks are handed to :func:`lightning_vdnn.stream_layers` (weights,
gradients and optimizer state in host memory) after Accelerate prepared them without moving them, and the
prepared optimizers step those blocks on the host.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import dataclasses

import torch
from accelerate import Accelerator
from torch import nn

from lightning_vdnn.config import VDNNConfig
from lightning_vdnn.integrations.options import ACCELERATE, OFFLOAD_ACTIVATIONS
from lightning_vdnn.integrations.adapters.accelerate import after_backward, before_clipping, wrap_forward
from lightning_vdnn.integrations.torch_loop import ActivationOffload, offload_activations, stream_layers
from lightning_vdnn.report.memory_report import MemoryReport
from lightning_vdnn.streaming.bf16_grads import check_clipping
from lightning_vdnn.streaming.streamer import LayerStreamer

_BY_MODEL: "weakref.WeakKeyDictionary[nn.Module, ActivationOffload]" = weakref.WeakKeyDictionary()
_BY_ACCELERATOR: "weakref.WeakKeyDictionary[Accelerator, list[ActivationOffload]]" = weakref.WeakKeyDictionary()
_STREAMERS: "weakref.WeakKeyDictionary[nn.Module, LayerStreamer]" = weakref.WeakKeyDictionary()
#: each accelerator's streamers, which its clipping checks (``streaming/bf16_grads.py``)
_STREAMED_BY: "weakref.WeakKeyDictionary[Accelerator, list[LayerStreamer]]" = weakref.WeakKeyDictionary()
#: Accelerate's ``mixed_precision`` as the precision string layer streaming sizes its device copies by.
_PRECISION = {"no": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


@ACCELERATE.signed
def prepare(accelerator: Accelerator, *objects: Any, device_placement: Optional[list[bool]] = None,
            **options: Any) -> Any:
    """``accelerator.prepare(*objects)``, with vDNN activation offload wired into every model among them.

    Returns what ``accelerator.prepare`` returns (one object, or a tuple in the order given). The arguments
    after ``objects`` are those of :func:`lightning_vdnn.offload_activations`, validated before anything is
    prepared; ``layer_streaming``, ``resident_blocks``, ``microbatches`` and ``saved_blocks`` are L2L's (one
    process only; block updates run at ``optimizer.step()``, so ``accelerator.clip_grad_norm_`` between backward
    and step is fine, except with ``host_state_dtype="bf16"``, whose bf16 host gradients it refuses to clip).

    Raises:
        ValueError, TypeError: for a bad argument, naming it (``policy='bogus' is not a policy; ...``).

    Example::

        model, optimizer = lightning_vdnn.integrations.accelerate.prepare(accelerator, model, optimizer, policy="all")
        accelerator.backward(loss_fn(model(x), y))   # closes the offload pass
        print(lightning_vdnn.integrations.accelerate.memory_report(model))
    """
    config = ACCELERATE.config((), options)  # fail before Accelerate moves or wraps anything
    if config.layer_streaming:
        config.refuse_auto_choices()
        if accelerator.num_processes > 1:
            raise ValueError(f"layer_streaming=True trains on one device, but Accelerate runs "
                             f"{accelerator.num_processes} processes. Launch one process, or leave layer "
                             "streaming off and use activation offload alone.")
        # streamed blocks stay in host memory: Accelerate must not move the models (the streamer moves the rest)
        device_placement = [not isinstance(o, nn.Module) and (device_placement or [True] * len(objects))[i]
                            for i, o in enumerate(objects)]
    prepared = accelerator.prepare(*objects, device_placement=device_placement)
    outputs = prepared if isinstance(prepared, tuple) else (prepared,)
    optimizers = [getattr(o, "optimizer", o) for o in outputs if isinstance(getattr(o, "optimizer", None),
                                                                           torch.optim.Optimizer)]
    for obj in outputs:
        if isinstance(obj, nn.Module):
            inner = accelerator.unwrap_model(obj, keep_fp32_wrapper=True)  # the user's module, out of DDP & co.
            if config.layer_streaming:
                _STREAMERS[obj] = _STREAMERS[inner] = stream_layers(
                    inner, *optimizers, layers=config.layers, device=accelerator.device,
                    pin_memory=config.pin_memory, precision=_PRECISION.get(str(accelerator.mixed_precision),
                                                                           "32-true"),
                    resident_blocks=config.resident_blocks, microbatches=config.microbatches,
                    saved_blocks=config.streamed_saves,  # None (all) or a number, under the policy
                    host_optimizer=config.host_optimizer, host_state_dtype=config.host_state_dtype)
                _check_clipping(accelerator, _STREAMERS[obj])
            handle = offload_activations(inner, **_offload_options(config), device=accelerator.device)
            _wrap_forward(obj, handle)
            _BY_MODEL[obj] = _BY_MODEL[inner] = handle
            _wrap_backward(accelerator, handle)
    return prepared


def _check_clipping(accelerator: Accelerator, streamer: LayerStreamer) -> None:
    """``accelerator.clip_grad_norm_``/``clip_grad_value_`` refuse the blocks' bf16 host gradients, which they
    would skip (they read ``p.grad``)."""
    streamers = _STREAMED_BY.get(accelerator)
    if streamers is None:
        streamers = _STREAMED_BY[accelerator] = []
        before_clipping(accelerator, lambda params, how: check_clipping(streamers, params, how))
    streamers.append(streamer)


def _offload_options(config: VDNNConfig) -> dict[str, Any]:
    """``config``'s activation offload as ``offload_activations`` takes it (the blocks are the streamer's)."""
    return {arg: getattr(config, f.name) for arg, f in OFFLOAD_ACTIVATIONS.fields.items()}


def _wrap_forward(model: nn.Module, handle: ActivationOffload) -> None:
    """The model's forward runs inside ``handle`` (its saved-tensor hooks), unwrappable as Accelerate's own."""
    wrap_forward(model, lambda: handle)


def _wrap_backward(accelerator: Accelerator, handle: ActivationOffload) -> None:
    """After each ``accelerator.backward``, every handle of this accelerator closes its pass."""
    handles = _BY_ACCELERATOR.get(accelerator)
    if handles is not None:
        handles.append(handle)
        return
    handles = _BY_ACCELERATOR[accelerator] = [handle]

    def finish() -> None:
        for h in handles:
            h.step_done()

    after_backward(accelerator, finish)


def memory_report(model: nn.Module) -> MemoryReport:
    """Offload statistics of the last pass of a model returned by :func:`prepare`.

    Raises:
        ValueError: ``model`` did not come from :func:`prepare`.
    """
    handle = _BY_MODEL.get(model)
    if handle is None:
        raise ValueError(f"{type(model).__name__} was not prepared by lightning_vdnn.integrations.accelerate.prepare; "
                         "pass the model that prepare() returned.")
    streamer = _STREAMERS.get(model)
    return handle.report() if streamer is None else dataclasses.replace(handle.report(), **streamer.stats())


def synchronize(model: nn.Module) -> None:
    """Wait for the streamed blocks' host updates of ``model`` (a model :func:`prepare` returned with
    ``layer_streaming=True``): call it before reading or saving their weights after ``optimizer.step()``."""
    streamer = _STREAMERS.get(model)
    if streamer is not None:
        streamer.synchronize()


def release(model: nn.Module) -> None:
    """Stop streaming ``model``: queued updates land, the blocks become ordinary (host) parameters again."""
    streamer = _STREAMERS.pop(model, None)
    if streamer is not None:
        streamer.close()
        for streamers in _STREAMED_BY.values():
            if streamer in streamers:
                streamers.remove(streamer)
