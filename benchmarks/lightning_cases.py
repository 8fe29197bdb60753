"""Our modes, each run through Lightning's ``Trainer`` exactly as a user would: ``Trainer(strategy=name)``.

``lightning_plain`` (``strategy="auto"``) runs the same way, so that its ratio to the raw ``plain`` loop is
Lightning's own overhead and every other Lightning case can be read against both. Under ``torchrun``
(``run.py --devices N``) the Trainer gets ``devices=N`` and finds its ranks in the environment, as a user's
script launched so would: ``auto`` becomes DDP, ``vdnn_zero*`` DeepSpeed over N ranks.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import pickle
import re
from typing import Optional, Union

import torch

from benchmarks.measure import StepClock
from benchmarks.registry import MIXED
from benchmarks.workloads import Workload, flat_weights


def _module(w: Workload, device: torch.device):
    """A LightningModule around the workload's own model: its loss, its optimizer, nothing logged."""
    import lightning as L

    class BenchModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = w.model  # the attribute name the strategies' ``layers="model.blocks"`` expects

        def training_step(self, batch, batch_idx):
            return w.loss(self.model, batch)

        def configure_optimizers(self):
            return w.optimizer(self.model.parameters(), device)

    return BenchModule()


def _clock(device: torch.device, settle: Optional[tuple[int, int]] = None):
    """A Callback timing each training batch with the same synchronized clock as the raw loops (marking where
    forward and backward end, ``StepClock.mark``), and keeping the loss ``training_step`` returned, whether the
    strategy's planner measured the step, and at the end what the planner last planned from
    (``AutoPlanner.planned_from``, pickled: ``benchmarks/replan.py`` reads it).

    ``settle=(warmup, steps)``: stop training once ``steps`` steps have run after ``warmup`` and after the last
    step the planner measured (``measure.settled_warmup``); the Trainer's ``max_steps`` caps the wait. A profiled
    step (``measure.profiling``) is then the one after those: a step of the settled plan, wherever it falls."""
    import lightning as L

    from benchmarks.measure import ProfileRequest, settled_warmup

    class BatchClock(L.Callback):
        def __init__(self) -> None:
            self.clock = StepClock(device)
            self.planner_inputs: Optional[str] = None
            self.profile_after: Optional[ProfileRequest] = None
            if settle is not None:  # its index is known once the planner has settled
                self.profile_after, self.clock.request = self.clock.request, None

        def on_train_end(self, trainer, pl_module) -> None:  # before the strategy's teardown drops its planner
            planner = getattr(trainer.strategy, "_planner", None)
            state = planner.planned_from() if planner is not None else {}
            if state:
                self.planner_inputs = base64.b64encode(pickle.dumps(state)).decode()

        def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
            self.clock.planning.append(bool(getattr(trainer.strategy, "planning", False)))
            self.clock.start()

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            self.clock.mark("forward")

        def on_after_backward(self, trainer, pl_module) -> None:
            self.clock.mark("backward")

        def on_train_batch_end(self, trainer, pl_module, outputs, *args, **kwargs) -> None:
            self.clock.stop(outputs["loss"] if isinstance(outputs, dict) else outputs)
            if settle is not None:  # after the clock: the ranks agree (all must stop at one step) untimed
                timed = len(self.clock.times) - settled_warmup(self.clock.planning, settle[0])
                after = self.profile_after
                if after is not None and timed == settle[1] and self.clock.request is None:
                    self.clock.request = ProfileRequest(len(self.clock.times), after.trace_path)
                enough = timed >= settle[1] + (after is not None)
                done = trainer.strategy.reduce_boolean_decision(enough, all=True)
                trainer.should_stop = trainer.should_stop or done

    return BatchClock()


class RepeatBatch:
    """The same (device-resident) batch ``n`` times: what Lightning iterates instead of a DataLoader."""

    def __init__(self, batch: tuple, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return itertools.repeat(self.batch, self.n)

    def __len__(self) -> int:
        return self.n


#: ``l2l`` cases of the host update's options (``VDNNConfig.host_optimizer``, ``host_state_dtype``).
HOST_UPDATES = {"l2l_torch": ("torch", "fp32"), "l2l_ds": ("deepspeed", "fp32"), "l2l_bf16s": ("auto", "bf16"),
                "l2l_bf16g": ("torch", "bf16"), "l2l_ds_bf16s": ("deepspeed", "bf16"),
                "l2l_native": ("native", "fp32"), "l2l_native_bf16s": ("native", "bf16")}


def strategy_for(name: str, memory_budget: Optional[int]) -> Union[str, object]:
    """``"auto"`` for ``lightning_plain``; else the registered name, or its class with ``memory_budget``.

    Raises:
        NotImplementedError: ``name`` is not registered by ``lightning_vdnn`` (that mode is not built yet),
            or the strategy refuses an argument it does not implement yet.
    """
    if name == "lightning_plain":
        return "auto"
    import lightning_vdnn  # noqa: F401  (registers the strategy names)
    from lightning.pytorch.strategies import StrategyRegistry

    extra = {}
    if name in HOST_UPDATES:  # l2l with the blocks' host update on another kernel, or the lean bf16 host state
        from lightning_vdnn import VDNNConfig, VDNNStrategy

        backend, moments = HOST_UPDATES[name]
        return VDNNStrategy(config=VDNNConfig(**StrategyRegistry["l2l"]["init_params"], host_optimizer=backend,
                                              host_state_dtype=moments))
    if mix := MIXED.match(name):  # R resident (the first K keeping theirs), S streamed saving
        return _mixed(int(mix[2]), int(mix[3]), int(mix[4] or 0), mix[1], memory_budget)
    if name.startswith("l2l_r"):  # l2l_rN: l2l with the first N blocks resident
        name, extra = "l2l", {"resident_blocks": int(name[len("l2l_r"):])}
    elif name == "l2l_lean":  # l2l at its least device memory (the loss in chunks is the workload's)
        name, extra = "l2l", {"activation_offload": "all", "offload_optimizer": True, "saved_blocks": 0}
    elif name == "l2l_mb8_lean":  # l2l_lean with 8 layer-major microbatches (the chunked loss is the workload's)
        name, extra = "l2l", {"activation_offload": "all", "offload_optimizer": True, "saved_blocks": 0,
                              "microbatches": 8}
    elif name == "l2l_all":  # every streamed block's activations to the host, none recomputed
        name, extra = "l2l", {"activation_offload": "all"}
    elif mb := re.fullmatch(r"l2l_mb(\d+)(?:_(keep|off)(\d+)|_(auto))?", name):  # l2l_mbK: K batches, layer-major;
        extra = {"microbatches": int(mb[1])}  # _keepN/_offN: N blocks save theirs; _auto: as many as fit the GPU
        if mb[2]:
            extra.update(saved_blocks=int(mb[3]), activation_offload="none" if mb[2] == "keep" else "all")
        if mb[4]:
            extra.update(saved_blocks="auto")
        if mb[2] == "off":
            extra.update(max_inflight_bytes=8 * 2**30)
        name = "l2l"
    elif name == "vdnn_lean":  # the planner, kept layers allowed to make their activation outputs again
        name, extra = "vdnn", {"lean_activations": True}
    elif chunked := re.fullmatch(r"(vdnn(?:_all)?)_c(\d+)", name):  # the conv trunk in K batch chunks
        name, extra = chunked[1], {"batch_chunks": int(chunked[2]), "chunk_layers": "model.features"}

    if name not in StrategyRegistry:
        ours = sorted(set(getattr(lightning_vdnn, "REGISTERED", ())))
        raise NotImplementedError(f"strategy {name!r} is not registered by lightning_vdnn yet (it has {ours}).")
    if memory_budget is None and not extra:
        return name
    entry = StrategyRegistry[name]
    if memory_budget is not None and name == "l2l":  # l2l's budget chooses its resident blocks ("auto")
        extra.update(memory_budget=memory_budget)
    elif memory_budget is not None:  # a budget is the planner's: it runs with activation_offload="auto"
        extra.update(activation_offload="auto", memory_budget=memory_budget)
    return entry["strategy"](**{**entry["init_params"], **extra})


def _mixed(resident: int, saving: int, keeping: int, kind: str, memory_budget: Optional[int]) -> object:
    """L2L with ``resident`` blocks on the device, of which the first ``keeping`` keep their activations and the
    rest recompute them, and ``saving`` streamed blocks keeping theirs: a hand-set point of the space
    ``strategy="vdnn"`` chooses from under a budget. ``kind`` ``"l2l"``: activations stay on the device;
    ``"vdnn"``: the activation planner places them within ``memory_budget``."""
    from lightning_vdnn import VDNNStrategy

    class Mixed(VDNNStrategy):
        def _build_streamer(self, resident_: Optional[int], recompute_from: Optional[int] = None):
            streamer = super()._build_streamer(resident_, keeping if recompute_from is None else recompute_from)
            streamer.set_saving(saving)
            return streamer

    policy = {"activation_offload": "none"} if kind == "l2l" else {
        "activation_offload": "auto", "memory_budget": memory_budget}
    return Mixed(layer_streaming=True, resident_blocks=resident, **policy)


def run_lightning(name: str, w: Workload, device: torch.device, n: int, memory_budget: Optional[int] = None,
                  devices: int = 1, settle: Optional[tuple[int, int, int]] = None) -> tuple[StepClock, dict]:
    """The clock (step times, losses) of ``Trainer.fit`` with strategy ``name`` on ``devices`` devices over
    ``n`` copies of the batch, and the strategy's memory report.

    ``settle=(warmup, steps, extra)``: up to ``extra`` more steps, while the planner measures steps after the
    warm-up, so that ``steps`` steps of its settled plan are timed (``_clock``)."""
    import lightning as L
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = strategy_for(name, memory_budget)
    clock = _clock(device, settle[:2] if settle else None)
    n += settle[2] if settle else 0
    trainer = L.Trainer(
        strategy=strategy, accelerator="gpu" if device.type == "cuda" else "cpu", devices=devices,
        precision="bf16-mixed" if device.type == "cuda" else "32-true", max_steps=n, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
    )
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        flat_weights(w.model)
    trainer.fit(_module(w, device), train_dataloaders=RepeatBatch(w.batch, n))
    extra = {}
    if hasattr(trainer.strategy, "memory_report"):
        extra["memory_report"] = dataclasses.asdict(trainer.strategy.memory_report())
    if clock.planner_inputs is not None:
        extra["planner_inputs"] = clock.planner_inputs
    return clock.clock, extra
