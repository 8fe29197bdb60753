"""Train one configuration per strategy (a Hydra multirun) and print one table comparing them at the end.

    python recipes/compare.py -m strategy=plain,vdnn_all,vdnn_conv trainer.max_steps=20
    python recipes/compare.py -m strategy=plain,vdnn_all model=vgg data=images trainer.max_steps=20

Each job appends a JSON line (step time, final loss, bytes offloaded, peak device memory) to
``results.jsonl`` in the sweep directory; the ``ResultsTable`` Hydra callback reads it when the sweep ends.
The configuration is ``lightning_vdnn/conf/compare.yaml``: the default run of ``recipes/train.py``, quieter.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

import lightning_vdnn  # noqa: F401  (registers the strategy names)

RESULTS = "results.jsonl"


class StepTimer(L.Callback):
    """Wall time per training step (the first, warm-up step excluded when there are others) and the last loss."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.loss: Optional[float] = None
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        _sync(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any) -> None:
        _sync(trainer)
        self.times.append(time.perf_counter() - self._start)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.loss = loss.item()

    @property
    def step_ms(self) -> float:
        times = self.times[1:] or self.times
        return 1000 * sum(times) / max(len(times), 1)


def _sync(trainer: L.Trainer) -> None:
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize(trainer.strategy.root_device)


def build_strategy(cfg: DictConfig):
    """A strategy object from ``_target_``, or a registered name (``name: auto`` for Lightning's default)."""
    return instantiate(cfg) if "_target_" in cfg else cfg.name


def result_row(name: str, trainer: L.Trainer, timer: StepTimer) -> dict[str, Any]:
    report = trainer.strategy.memory_report() if hasattr(trainer.strategy, "memory_report") else None
    peak = report.peak_device_bytes if report is not None else None
    if peak is None and trainer.strategy.root_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(trainer.strategy.root_device)
    return {"strategy": name, "steps": len(timer.times), "step_ms": timer.step_ms, "final_loss": timer.loss,
            "offloaded_bytes": report.offloaded_bytes if report is not None else 0, "peak_device_bytes": peak}


def print_table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    table = Table(title=f"lightning_vdnn compare ({path})")
    for column in ("strategy", "steps", "step time (ms)", "final loss", "offloaded (MiB)", "peak device (MiB)"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for r in rows:
        loss = "n/a" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        peak = "n/a" if r["peak_device_bytes"] is None else f"{r['peak_device_bytes'] / 2**20:.1f}"
        table.add_row(r["strategy"], str(r["steps"]), f"{r['step_ms']:.1f}", loss,
                      f"{r['offloaded_bytes'] / 2**20:.1f}", peak)
    Console(width=120).print(table)


class ResultsTable(Callback):
    """Hydra callback: the sweep's table, once every job has finished."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print_table(Path(config.hydra.sweep.dir) / RESULTS)


@hydra.main(version_base="1.3", config_path="pkg://lightning_vdnn.conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    L.seed_everything(cfg.seed)
    strategy = build_strategy(cfg.strategy)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    timer = StepTimer()
    trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=[timer])
    trainer.fit(model, datamodule=datamodule)

    multirun = hc.mode == RunMode.MULTIRUN
    path = Path(hc.sweep.dir if multirun else hc.runtime.output_dir) / RESULTS
    with path.open("a") as fh:
        fh.write(json.dumps(result_row(hc.runtime.choices["strategy"], trainer, timer)) + "\n")
    if not multirun:
        print_table(path)


if __name__ == "__main__":
    main()
