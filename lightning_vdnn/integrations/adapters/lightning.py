"""What ``lightning_vdnn`` reads or writes inside Lightning where Lightning has no public hook for it.

Written against lightning 2.6.6 (``tests/test_adapters.py`` checks every name below, and fails naming the
one that changed). Each function says why no public hook does the job.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

#: The Lightning release these functions were written (and tested) against.
WRITTEN_AGAINST = "2.6.6"

#: ``_ResultMetric`` fields that hold what ``self.log`` accumulated for one key (``LoggedResults``).
RESULT_METRIC_STATE = ("value", "cumulated_batch_size", "_forward_cache", "_update_count", "_computed", "has_reset")

#: ``DeepSpeedStrategy`` methods ``VDNNZeroStrategy`` overrides although Lightning keeps them private: the
#: engine is built and the process group started only there (name: the parameters after ``self``).
DEEPSPEED_PRIVATE_OVERRIDES = {
    "_setup_model_and_optimizer": ("model", "optimizer", "lr_scheduler"),
    "_initialize_deepspeed_inference": ("model",),
    "_init_deepspeed_distributed": (),
    "_load_config": ("config",),
}


@contextlib.contextmanager
def running_hook(module: Any, name: str) -> Iterator[None]:
    """Run the block as Lightning's hook ``name`` of ``module``: ``self.log`` files what it logs under that
    hook. Lightning sets ``LightningModule._current_fx_name`` only around the hooks its loops call; an OOM retry
    runs ``training_step`` again from inside ``backward``, which has no public way to say so."""
    previous, module._current_fx_name = module._current_fx_name, name
    try:
        yield
    finally:
        module._current_fx_name = previous


def should_update_logs(trainer: Any) -> bool:
    """Whether this step is one the Trainer logs at (``log_every_n_steps``): the logger connector decides,
    and only privately; Lightning's own monitors (``LearningRateMonitor``, ``DeviceStatsMonitor``) ask it the
    same way."""
    return trainer._logger_connector.should_update_logs


def accumulating(trainer: Any) -> bool:
    """Whether the running batch accumulates gradients without an optimizer step: Lightning logs no step
    metrics in such a batch (``_LoggerConnector.update_train_step_metrics``), and only the fit loop knows."""
    return trainer.fit_loop._should_accumulate()


def logging_step(trainer: Any) -> int:
    """The step the running batch's metrics are logged under: the fit loop's count of batches that stepped,
    which ``trainer.global_step`` (optimizer steps) is not under gradient accumulation, or before the count
    moves on at the end of the batch."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


class LoggedResults:
    """The values ``self.log`` has accumulated in the running loop (the trainer's ``_ResultCollection``), put
    back before an OOM retry, so a batch that runs again is logged once. Lightning replaces a logged value's
    state tensors on each update (``value = value + ...``), never writes them in place, so holding the old
    tensors is a snapshot. ``trainer``: None (outside a Trainer) snapshots nothing."""

    def __init__(self, trainer: Optional[Any]) -> None:
        self.results = getattr(trainer, "_results", None)
        self.saved = {} if self.results is None else {
            key: (metric, {a: getattr(metric, a) for a in RESULT_METRIC_STATE if hasattr(metric, a)})
            for key, metric in self.results.items()}

    def restore(self) -> None:
        if self.results is None:
            return
        for key in [k for k in self.results if k not in self.saved]:  # first logged by the failed attempt
            del self.results[key]
        for key, (metric, state) in self.saved.items():
            self.results[key] = metric
            for attr, value in state.items():
                setattr(metric, attr, value)
