"""Lightning callbacks that show what our strategies measured, as Lightning's own monitors show theirs.

:class:`MemoryMonitor` logs the per-step numbers (``vdnn/offloaded_GiB``, ...) to the Trainer's loggers at the
Trainer's cadence, as ``DeviceStatsMonitor`` logs device statistics: only a Trainer given one makes those logger
calls, so one without it logs exactly what plain Lightning logs. :class:`MemorySummary` prints the per-layer table
and saves the plot of one step at the end of ``fit``, as ``ModelSummary`` prints the model at its start; it makes
no logger call. The strategy runs one itself when ``fit_report`` asks for it and the Trainer has none (without
adding it to ``trainer.callbacks``, which stays the list the user and Lightning made).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from typing_extensions import override

from lightning_vdnn.integrations.adapters.lightning import accumulating, logging_step, should_update_logs
from lightning_vdnn.report.end_of_fit import print_report


def _measuring_strategy(trainer: "pl.Trainer", callback: str) -> Any:
    """The Trainer's strategy if it is one of ours (it has ``memory_report``), else a clear error."""
    strategy = trainer.strategy
    if not callable(getattr(strategy, "memory_report", None)):
        raise MisconfigurationException(
            f"{callback} shows the numbers lightning_vdnn's strategies measure, and trainer.strategy is "
            f"{type(strategy).__name__}. Use one of them (Trainer(strategy='vdnn_all'), 'vdnn', 'l2l', ...), or "
            f"drop {callback} from callbacks.")
    return strategy


class MemoryMonitor(Callback):
    """Log each training step's offload numbers (``MemoryReport.metrics()``: ``vdnn/offloaded_GiB``,
    ``vdnn/peak_device_GiB``, ``vdnn/exposed_copy_ms``, ...) to every logger of the Trainer.

    They are logged at the steps Lightning logs the step's own metrics at (every ``log_every_n_steps``; never
    with 0; not in the middle of gradient accumulation), under the same step number, in a ``log_metrics`` call
    of their own, as ``DeviceStatsMonitor`` logs its statistics. Not through ``self.log``: they stay out of
    ``trainer.callback_metrics``, which checkpointing and early stopping read.

    Raises:
        MisconfigurationException: at ``fit``, with ``Trainer(logger=False)`` or a strategy that is not one of
            ``lightning_vdnn``'s.

    Example::

        import lightning_vdnn
        trainer = Trainer(strategy="vdnn", callbacks=[lightning_vdnn.MemoryMonitor()], log_every_n_steps=10)
    """

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use MemoryMonitor with Trainer(logger=False): it logs to the Trainer's loggers. Give the "
                "Trainer a logger, or read trainer.strategy.memory_report() after fit instead.")
        _measuring_strategy(trainer, type(self).__name__)

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: STEP_OUTPUT,
                           batch: Any, batch_idx: int) -> None:
        if pl_module.automatic_optimization and accumulating(trainer):
            return  # no optimizer step yet: Lightning logs nothing in this batch either
        if not should_update_logs(trainer):
            return
        metrics = trainer.strategy.step_metrics()
        if not metrics:
            return
        step = logging_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


class MemorySummary(Callback):
    """At the end of ``fit``, print the per-layer table of what was saved for backward (the ``top`` layers,
    the rest summed, totals, predicted vs measured peak) and save ``vdnn_memory_timeline.png``, memory over
    one step (``report/end_of_fit.py``).

    Args:
        top: layers shown one per row.
        report_dir: where the PNG goes: a path or any fsspec URL. ``None``: the strategy's ``report_dir``, else
            the logger's log directory (``trainer.log_dir``, written through fsspec), else nowhere: without a
            logger Lightning writes no logs, and the PNG would land beside the checkpoints or in the working
            directory, where nobody asked for a file.

    The strategy runs one itself when its ``fit_report`` asks (by default when the Trainer prints its model
    summary) and ``trainer.callbacks`` holds none; add one to choose ``top`` or ``report_dir``, or to print the
    report whatever ``fit_report`` says. It makes no logger call.
    """

    def __init__(self, top: int = 10, report_dir: Union[str, os.PathLike, None] = None) -> None:
        if not isinstance(top, int) or isinstance(top, bool) or top < 1:
            raise ValueError(f"MemorySummary(top={top!r}): the number of layers shown must be an int >= 1.")
        self.top = top
        self.report_dir = report_dir

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            _measuring_strategy(trainer, type(self).__name__)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        directory = self._directory(trainer)  # on every rank: trainer.log_dir broadcasts
        report = trainer.strategy.memory_report()
        if trainer.is_global_zero and report.layers:
            print_report(report, directory, self.top)

    def _directory(self, trainer: "pl.Trainer") -> Optional[Union[str, os.PathLike]]:
        if self.report_dir is not None:
            return self.report_dir
        configured = getattr(trainer.strategy, "vdnn_config", None)
        if configured is not None and configured.report_dir is not None:
            return configured.report_dir
        return trainer.log_dir if trainer.loggers else None
