"""The per-layer report: rows that add up to the totals, decisions that are the plan's, and at the end of fit a
table on the console and a PNG in the log directory, or silence when asked."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from conftest import fit, image_loader
from lightning_vdnn import MemorySummary, VDNNStrategy
from lightning_vdnn.report.end_of_fit import TABLE_TITLE, TIMELINE_FILE, layer_table
from lightning_vdnn.report.memory_report import LayerStats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PlanAtEnd(L.Callback):
    """The plan the last steps ran (the strategy forgets its planner at teardown)."""

    def on_train_end(self, trainer, module):
        self.kept = trainer.strategy._planner.plan.kept


def auto_budget(cnn) -> int:
    _, probe = fit(cnn, image_loader(), VDNNStrategy("all", min_offload_bytes=0), max_steps=1)
    return probe.strategy.memory_report().offloaded_bytes // 2


def test_rows_add_up_to_the_totals_and_decisions_are_the_plan(cnn):
    plan = PlanAtEnd()
    _, trainer = fit(cnn, image_loader(), VDNNStrategy("auto", min_offload_bytes=0, memory_budget=auto_budget(cnn)),
                     max_steps=5, callbacks=[plan])
    report = trainer.strategy.memory_report()
    rows = report.layers
    assert all(isinstance(r, LayerStats) for r in rows) and [r.index for r in rows] == list(range(len(rows)))
    assert sum(r.saved_bytes for r in rows) == report.offloaded_bytes + report.kept_bytes
    assert sum(r.offloaded_bytes for r in rows) == report.offloaded_bytes
    assert {r.index for r in rows if r.decision == "keep"} == plan.kept
    assert 0 < len(plan.kept) < len(rows) and report.layers_kept == len(plan.kept)
    assert all(r.offloaded_bytes == 0 for r in rows if r.decision == "keep")
    assert all(r.kept_bytes == 0 for r in rows if r.decision == "offload")  # min_offload_bytes=0: all of it
    assert rows[1].name == "net.stem.0" and rows[-1].name == "net.head"
    assert all(r.forward_ms is not None and r.forward_ms >= 0 for r in rows)
    assert not any("layer" in k for k in report.metrics())  # the table is not logged
    assert report.timeline == ()  # nothing to sample on a CPU device


def test_fixed_policy_rows_say_what_moved(cnn):
    _, trainer = fit(cnn, image_loader(), VDNNStrategy("all", min_offload_bytes=2**17), max_steps=2)
    report = trainer.strategy.memory_report()
    moved = [r for r in report.layers if r.decision == "offload"]
    assert moved and all(r.offloaded_bytes > 0 for r in moved)
    assert sum(r.saved_bytes for r in report.layers) == report.offloaded_bytes + report.kept_bytes
    assert any(r.decision == "keep" and r.saved_bytes for r in report.layers)  # under the threshold


def test_fit_prints_the_table_and_saves_the_timeline_in_the_log_dir(cnn, tmp_path, capsys):
    logger = CSVLogger(tmp_path)
    _, trainer = fit(cnn, image_loader(), VDNNStrategy("auto", min_offload_bytes=0, memory_budget=auto_budget(cnn),
                                                       fit_report=True), max_steps=4, logger=logger)
    out = capsys.readouterr().out
    assert TABLE_TITLE in out and "net.stem.1" in out and "predicted" in out and "measured" in out
    png = tmp_path / "lightning_logs" / "version_0" / TIMELINE_FILE
    assert trainer.log_dir == str(png.parent) and str(png) in out.replace("\n", "")
    assert png.read_bytes()[:8] == PNG_MAGIC
    from matplotlib.image import imread

    height, width, _ = imread(png).shape
    assert height > 200 and width > 400


@pytest.mark.parametrize("fit_report, summary, shown", [
    (None, True, True), (None, False, False), (False, True, False), (True, False, True),
])
def test_report_follows_the_model_summary_unless_told(cnn, tmp_path, capsys, fit_report, summary, shown):
    logger = CSVLogger(tmp_path)
    fit(cnn, image_loader(), VDNNStrategy("all", fit_report=fit_report), max_steps=1, logger=logger,
        enable_model_summary=summary)
    assert (TABLE_TITLE in capsys.readouterr().out) is shown
    assert (Path(logger.log_dir) / TIMELINE_FILE).exists() is shown


@pytest.mark.parametrize("fit_report", [None, False, True])
def test_a_memory_summary_callback_prints_once_as_told(cnn, tmp_path, capsys, fit_report):
    """The user's ``MemorySummary`` prints whatever ``fit_report`` says, with its ``top`` and ``report_dir``, and
    the strategy then prints none of its own; neither touches ``trainer.callbacks`` or the logger."""
    summary, logger = MemorySummary(top=2, report_dir=tmp_path / "plots"), CSVLogger(tmp_path)
    _, trainer = fit(cnn, image_loader(), VDNNStrategy("all", fit_report=fit_report), max_steps=1, logger=logger,
                     enable_model_summary=True, callbacks=[summary])
    out = capsys.readouterr().out
    assert out.count(TABLE_TITLE) == 1 and "more layers" in out
    assert (tmp_path / "plots" / TIMELINE_FILE).read_bytes()[:8] == PNG_MAGIC
    assert not (Path(logger.log_dir) / TIMELINE_FILE).exists()
    assert [type(cb) for cb in trainer.callbacks].count(MemorySummary) == 1


@pytest.mark.parametrize("top", [0, 1.5, True])
def test_memory_summary_refuses_a_bad_top(top):
    with pytest.raises(ValueError, match=rf"MemorySummary\(top={top!r}\).*int >= 1"):
        MemorySummary(top=top)


def test_without_a_logger_the_plot_is_saved_only_where_asked(cnn, tmp_path, monkeypatch, capsys):
    """``logger=False``: Lightning writes no logs, so no PNG beside the checkpoints or in the working directory;
    the table is still printed, and ``report_dir`` (a path or an fsspec URL) says where a PNG should go."""
    monkeypatch.chdir(tmp_path)
    fit(cnn, image_loader(), VDNNStrategy("all", fit_report=True), max_steps=1, default_root_dir=tmp_path / "root",
        enable_checkpointing=True)
    assert TABLE_TITLE in capsys.readouterr().out
    assert not list(tmp_path.rglob(TIMELINE_FILE))
    fit(cnn, image_loader(), VDNNStrategy("all", fit_report=True, report_dir=tmp_path / "plots"), max_steps=1)
    assert (tmp_path / "plots" / TIMELINE_FILE).read_bytes()[:8] == PNG_MAGIC
    url = f"memory://{uuid.uuid4().hex}/plots"
    fit(cnn, image_loader(), VDNNStrategy("all", fit_report=True, report_dir=url), max_steps=1)
    with fsspec.open(f"{url}/{TIMELINE_FILE}", "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "root"]  # no local folder named "memory:"


def test_table_sums_the_layers_beyond_the_top(cnn):
    _, trainer = fit(cnn, image_loader(), VDNNStrategy("all", min_offload_bytes=0), max_steps=1)
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(layer_table(trainer.strategy.memory_report(), top=3))
    text = console.export_text()
    assert "more layers" in text and "total (12 layers)" in text and "not measured on a CPU device" in text
