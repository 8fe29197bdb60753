"""Activation offload and layer streaming in any PyTorch loop: ``with offload_activations(model):`` around
the forward pass (or ``with offload_activations(policy="all"):`` without a model, as
``torch.autograd.graph.save_on_cpu``), ``stream_layers(model, optimizer)`` once before it.

The Lightning strategy, the Fabric strategy and the Accelerate wiring are thin shells around the same two
steps: turn keyword arguments into a validated :class:`VDNNConfig` (``integrations/options.py``) and attach an
:class:`ActivationOffloader` to a module (:func:`attach_offloader`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_vdnn.config import MemorySpec, VDNNConfig
from lightning_vdnn.integrations.options import OFFLOAD_ACTIVATIONS, STREAM_LAYERS
from lightning_vdnn.layers import LayerPaths, offload_units
from lightning_vdnn.offload.host_pool import concrete_device
from lightning_vdnn.offload.offloader import ActivationOffloader
from lightning_vdnn.planning.activation_plan import AutoPlanner
from lightning_vdnn.planning.compiled_budget import CompiledBudget
from lightning_vdnn.report.memory_report import MemoryReport
from lightning_vdnn.streaming.streamer import LayerStreamer

DeviceLike = Union[str, torch.device, None]


@STREAM_LAYERS.signed
def stream_layers(model: nn.Module, *optimizers: torch.optim.Optimizer, device: DeviceLike = "cuda",
                  precision: str = "32-true", eager_updates: bool = False, **options: Any) -> LayerStreamer:
    """L2L layer streaming for a plain PyTorch loop: from now on the blocks of ``model`` at ``layers`` keep
    weights, gradients and optimizer state in host memory and stream to ``device`` one block ahead; the rest of
    the model moves to ``device``. ``optimizers`` (built over ``model.parameters()`` as usual) step the blocks
    on the host. Call ``close()`` on the result to get an ordinary module back.

    ``precision`` is the autocast you run the forward under (``"bf16-mixed"`` streams bf16 copies). Block
    updates run on a host worker at ``optimizer.step()``, first block first, so the next forward overlaps them.
    With ``eager_updates=True`` and the backward inside ``optimizer.step(closure)`` (so its gradients are known
    to be the step's), a block is updated as soon as its gradients land, while backward still runs; use it only
    when the closure does not change gradients after backward (no clipping, no loss scaler).
    ``saved_blocks`` streamed blocks (None: all) save their activations through whatever saved-tensor hooks
    surround your forward (``offload_activations``, ``torch.autograd.graph.save_on_cpu``; none: kept on the
    device) instead of recomputing them in backward. Clip with ``streamer.clip_grad_norm_`` /
    ``streamer.clip_grad_value_`` (torch's, after the blocks' gradients landed): with ``host_state_dtype="bf16"`` the
    blocks' gradients are bf16 host buffers, not ``p.grad``, which ``torch.nn.utils.clip_grad_norm_`` would skip
    without a word; the streamer's refuses instead.

    Raises:
        ValueError, TypeError: a wrong ``layers`` path (listing the candidates), an unsupported optimizer or
            precision, a bad ``resident_blocks``/``microbatches``.
    """
    config = STREAM_LAYERS.config((), options)
    config.refuse_auto_choices()
    streamer = LayerStreamer(model, config.layers, torch.device(device), precision=precision,
                             pin_memory=config.pin_memory, resident=config.fixed_resident,
                             microbatches=config.microbatches, saved_blocks=config.saved_blocks,
                             host_optimizer=config.host_optimizer, host_state_dtype=config.host_state_dtype)
    streamer.set_eager(eager_updates)
    try:
        streamer.attach_optimizers(optimizers)
    except BaseException:
        streamer.close()
        raise
    return streamer


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the device of its first parameter or buffer (CPU for an empty module)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def attach_offloader(module: nn.Module, config: VDNNConfig, device: DeviceLike = None) -> ActivationOffloader:
    """An offloader running ``config`` on ``device`` (default: the module's), its layer hooks on ``module``.

    ``config.layers`` names the repeated blocks under ``module`` that prefetch counts in; a wrong path raises
    ``ValueError`` listing the candidates.
    """
    layers = offload_units(module, config.layers, config.activation_offload == "auto" and not config.layer_streaming)
    offloader = ActivationOffloader(
        torch.device(device) if device is not None else module_device(module), policy=config.offload_policy,
        min_offload_bytes=config.min_offload_bytes, prefetch_layers=config.prefetch_layers,
        pin_memory=config.pin_memory, max_inflight_bytes=config.max_inflight_bytes,
        watch_ops=config.selective_recompute, watch_pointwise=config.lean_activations,
    )
    offloader.attach(module, layers)
    return offloader


def check_model_free(policy: object, memory_budget: MemorySpec = None, layers: LayerPaths = None) -> None:
    """``offload_activations`` without a model offloads saved tensors one by one: refuse what needs the layers
    (before the config's own checks, which would suggest ``"auto"`` for a budget).

    Raises:
        ValueError: ``policy="auto"`` or ``"conv"``, a ``memory_budget`` or ``layers``, naming the fix.
    """
    if policy == "auto" or memory_budget is not None:
        raise ValueError(
            f"offload_activations(policy={policy!r}, memory_budget={memory_budget!r}) without a model: the 'auto' "
            "plan and a memory_budget need per-layer profiles of the model. Pass the model, "
            "offload_activations(model, policy='auto', memory_budget=...), or use policy='all' without one.")
    if policy == "conv":
        raise ValueError("offload_activations(policy='conv') without a model: 'conv' offloads the inputs of "
                         "convolution and linear layers, which needs the model's layers. Pass the model, "
                         "offload_activations(model, policy='conv'), or use policy='all'.")
    if layers:
        raise ValueError(f"offload_activations(layers={layers!r}) without a model: layers are paths under the "
                         "model. Pass the model, or leave layers out.")


def model_free_offloader(config: VDNNConfig, device: torch.device) -> ActivationOffloader:
    """An offloader running ``config`` on ``device`` with no model: every saved tensor the policy picks is its
    own group, prefetched in reverse order of saving within ``max_inflight_bytes``."""
    check_model_free(config.activation_offload, config.memory_budget, config.layers)
    return ActivationOffloader(device, policy=config.offload_policy, min_offload_bytes=config.min_offload_bytes,
                               prefetch_layers=config.prefetch_layers, pin_memory=config.pin_memory,
                               max_inflight_bytes=config.max_inflight_bytes, grouping="tensor")


class ActivationOffload:
    """A model's offloader as a re-enterable context manager: enter it around each forward pass.

    Entering starts a pass (and closes the previous one if :meth:`step_done` was not called); forward under
    ``torch.no_grad()`` is left alone, since there is no backward to save anything for. With policy
    ``"auto"``, each closed pass feeds the planner, which picks the layers the next pass keeps on the device,
    offloads or recomputes in backward (as :class:`~lightning_vdnn.VDNNStrategy` does). With ``model=None``, no
    layers: saved tensors move one by one (see :func:`model_free_offloader`). Build it with
    :func:`offload_activations`.
    """

    def __init__(self, model: Optional[nn.Module], config: VDNNConfig, device: DeviceLike = None) -> None:
        config.refuse_chunks("offload_activations (a plain loop)")
        self.model, self.config = model, config
        self.offloader: Optional[ActivationOffloader]
        if model is None:
            self.offloader = model_free_offloader(config, torch.device(device if device is not None else "cpu"))
        else:
            self.offloader = attach_offloader(model, config, device)
        auto = config.activation_offload == "auto"  # streamed blocks are recomputed already: no second checkpoint
        self.planner = AutoPlanner.for_device(config.budget, self.offloader.device,
                                              recompute=not config.layer_streaming,
                                              selective=config.selective_recompute,
                                              lean=config.lean_activations) if auto else None
        self.compiled_budget = CompiledBudget(config.compiled_activation_budget)
        self.compiled_budget.start()
        self._capture: Optional[contextlib.AbstractContextManager] = None
        self._open = False  # a captured pass not closed yet
        self._forward_peak: Optional[int] = None  # device peak when forward ended (the planner's model)

    def __enter__(self) -> "ActivationOffload":
        if self.offloader is None:
            raise RuntimeError("This ActivationOffload was closed; call offload_activations(model) again.")
        if self._capture is not None:
            raise RuntimeError("offload_activations(model) is already active: do not nest it around one model "
                               "(or, without a model, inside itself).")
        if torch.is_grad_enabled():
            self.step_done()
            # time layers (and, profiling, what a recompute would keep) in the steps the planner measures
            watch = self.planner.watching if self.planner is not None else self.offloader.passes == 0
            self.offloader.watch = watch and self.model is not None  # no model: no layers to time
            if self.planner is not None and self.planner.watching and self.offloader.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.offloader.device)
            self._capture = self.offloader.capture()
            self._capture.__enter__()
            self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.__exit__(*exc)
            if self.planner is not None and self.planner.watching and self.offloader.device.type == "cuda":
                self._forward_peak = torch.cuda.max_memory_allocated(self.offloader.device)

    def step_done(self) -> None:
        """Close this pass after backward, so :meth:`report` shows it now rather than at the next forward."""
        if self.offloader is None or not self._open:
            return
        self._open = False
        self.offloader.finish_pass()
        if self.planner is not None:
            self._update_plan(self.offloader, self.planner)

    def _update_plan(self, offloader: ActivationOffloader, planner: AutoPlanner) -> None:
        peak = None
        if planner.watching:  # the step's device peak; on a CPU device, what stayed is what the planner fits
            cuda = offloader.device.type == "cuda"
            peak = torch.cuda.max_memory_allocated(offloader.device) if cuda else offloader.report().kept_bytes
        plan = planner.observe(offloader.layer_profile(), peak, self._forward_peak)
        self.compiled_budget.after_observe(planner, plan, offloader.layer_modules())
        planner.apply_to(offloader)
        self._forward_peak = None

    def report(self) -> MemoryReport:
        """Statistics of the last finished pass (see :meth:`step_done`), with the plan's numbers for "auto"."""
        if self.offloader is None:
            return MemoryReport(policy=self.config.offload_policy)
        report, planner = self.offloader.report(), self.planner
        if planner is None:
            return report
        return dataclasses.replace(report, **planner.report_fields(len(self.offloader.layer_bytes())),
                                   compiled_activation_budget=self.compiled_budget.applied)

    def close(self) -> None:
        """Remove the hooks and free the host buffers (torch's partitioner budget as found); the model trains as if
        never touched."""
        self.compiled_budget.stop()
        if self.offloader is not None:
            self.offloader.close()
            self.offloader = None
        global _MODEL_FREE
        if self.model is None and _MODEL_FREE is self:
            _MODEL_FREE = None
        elif self.model is not None and _HANDLES.get(self.model) is self:
            del _HANDLES[self.model]

    @property
    def device(self) -> Optional[torch.device]:
        return self.offloader.device if self.offloader is not None else None


_HANDLES: "weakref.WeakKeyDictionary[nn.Module, ActivationOffload]" = weakref.WeakKeyDictionary()
_MODEL_FREE: Optional[ActivationOffload] = None  # the handle of offload_activations() without a model


@OFFLOAD_ACTIVATIONS.signed
def offload_activations(model: Optional[nn.Module] = None, *args: Any, device: DeviceLike = None,
                        **options: Any) -> ActivationOffload:
    """Offload what autograd saves inside ``with`` to host memory, for plain PyTorch training loops.

    Calling it again for the same model with the same arguments returns the same handle, so its host
    buffers are reused and the call can sit inside the loop; other arguments replace the old handle.

    Without a model it works as ``torch.autograd.graph.save_on_cpu``, with the pool, the policy's size floor and
    prefetch: every saved tensor of at least ``min_offload_bytes`` goes to the host, and in backward the ones
    saved before the tensor being read come back ahead of use (reverse order of saving, at most
    ``max_inflight_bytes`` ahead). Prefetch by layers and the ``"auto"`` planner need the model.

    Args:
        model: the module whose forward runs inside ``with``; its leaf modules (or ``layers``) are the layers
            prefetch counts in. None: no layers, tensors move one by one (see above).
        policy, min_offload_bytes, prefetch_layers, max_inflight_bytes, pin_memory, memory_budget: as in
            :class:`~lightning_vdnn.VDNNConfig` (``policy`` is its ``activation_offload``; ``memory_budget``
            goes with ``"auto"``). ``policy`` defaults to ``"auto"`` with a model, ``"all"`` without one.
        layers: dotted path under ``model`` to its repeated blocks, e.g. ``"blocks"``.
        device: where the model computes; default, the device of its parameters (without a model: CUDA if
            available, else the CPU; saved tensors on other devices are left alone).

    Raises:
        ValueError, TypeError: for a bad argument, naming it (``policy='bogus' is not a policy; ...``); without
            a model, ``policy="auto"``/``"conv"``, a ``memory_budget`` or ``layers`` (pass the model).

    Example::

        for x, y in loader:
            with lightning_vdnn.offload_activations(model, policy="all") as off:
                loss = F.cross_entropy(model(x), y)
            loss.backward(); opt.step(); opt.zero_grad()
        print(off.report())

        with lightning_vdnn.offload_activations(policy="all"):  # no model: as save_on_cpu, with prefetch
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    """
    if isinstance(model, str):
        raise TypeError(f"offload_activations({model!r}): the first argument is the model; pass the policy by "
                        f"keyword, offload_activations(policy={model!r}).")
    values = OFFLOAD_ACTIVATIONS.values(args, options)
    if values["activation_offload"] is None:
        values["activation_offload"] = "auto" if model is not None else "all"
    if model is None:
        check_model_free(values["activation_offload"], values["memory_budget"], values["layers"])
    config = OFFLOAD_ACTIVATIONS.build(values)
    if model is None:
        return _model_free_handle(config, device)
    handle = _HANDLES.get(model)
    wanted = concrete_device(device) if device is not None else module_device(model)
    if handle is not None and handle.config == config and handle.device == wanted:
        return handle
    if handle is not None:
        handle.close()
    handle = _HANDLES[model] = ActivationOffload(model, config, wanted)
    return handle


def _model_free_handle(config: VDNNConfig, device: DeviceLike) -> ActivationOffload:
    """The one handle without a model (its host pool reused while the arguments stay the same)."""
    global _MODEL_FREE
    wanted = concrete_device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    handle = _MODEL_FREE
    if handle is not None and handle.config == config and handle.device == wanted:
        return handle
    if handle is not None:
        handle.close()
    _MODEL_FREE = ActivationOffload(None, config, wanted)
    return _MODEL_FREE
