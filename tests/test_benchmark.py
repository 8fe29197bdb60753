"""The benchmark suite runs end to end on a CPU (``--tiny``), so that its code cannot rot between GPU runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "benchmarks" / "run.py")]
# Cases that must work on a CPU; the others are exercised only for how they fail.
GPT_CASES = ["plain", "lightning_plain", "checkpoint", "vdnn_all"]
VGG_CASES = ["plain", "save_on_cpu", "fsdp2_offload"]
SKIPPED, CRASHED = "vdnn_zero3", "checkpoint"


def _start(out: Path, model: str, cases: list[str], *extra: str) -> subprocess.Popen:
    cmd = RUN + ["--tiny", "--model", model, "--cases", ",".join(cases), "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Both tiny suites, run side by side (each case is a process of its own; two cores are enough)."""
    outs = {m: tmp_path_factory.mktemp(m) for m in ("gpt_tiny", "vgg_tiny")}
    procs = {
        "gpt_tiny": _start(outs["gpt_tiny"], "gpt_tiny", GPT_CASES + [SKIPPED]),
        "vgg_tiny": _start(outs["vgg_tiny"], "vgg_tiny", VGG_CASES + [CRASHED, "vdnn@50%"], "--fail-case", CRASHED),
    }
    for model, proc in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{model} suite failed:\n{output}"
    return outs


def _rows(out: Path) -> dict[str, dict]:
    lines = (out / "results.jsonl").read_text().splitlines()
    return {row["case"]: row for row in map(json.loads, lines)}


@pytest.mark.slow
@pytest.mark.parametrize("model,cases", [("gpt_tiny", GPT_CASES), ("vgg_tiny", VGG_CASES)])
def test_every_case_measured(runs, model, cases):
    rows = _rows(runs[model])
    for case in cases:
        row = rows[case]
        assert row["status"] == "ok", f"{case}: {row['status']}\n{row.get('traceback', '')}"
        assert len(row["step_s_all"]) == 2 + 3  # --tiny: 2 warm-up + 3 timed steps
        assert math.isfinite(row["step_s"]) and row["step_s"] > 0
        assert row["items_per_s"] > 0 and row["host_rss_bytes"] > 0
    assert rows["plain"]["time_ratio"] == pytest.approx(1.0)
    assert (runs[model] / "results.png").stat().st_size > 0
    table = (runs[model] / "results.md").read_text()
    assert all(f"| {case} |" in table for case in cases)


@pytest.mark.slow
def test_failures_are_rows_not_aborts(runs):
    assert _rows(runs["gpt_tiny"])[SKIPPED]["status"] == "skipped: needs CUDA"
    crashed = _rows(runs["vgg_tiny"])[CRASHED]
    assert crashed["status"] == "crashed: exit 70"
    assert "crashing on purpose" in crashed["output_tail"]
    assert "| checkpoint | crashed: exit 70 |" in (runs["vgg_tiny"] / "results.md").read_text()


@pytest.mark.slow
def test_budget_sweep_derives_bytes_from_plain(runs):
    rows = _rows(runs["vgg_tiny"])
    plain = rows["plain"]  # on a CPU plain has no device peak: the budget falls back to the capacity
    assert rows["vdnn@50%"]["memory_budget"] == int(0.5 * plain["device_total_bytes"])
    assert rows["vdnn@50%"]["status"]  # ok once the planner lands, "n/a: ..." until then
    assert "budgets are P% of the device's capacity" in (runs["vgg_tiny"] / "results.md").read_text()


@pytest.mark.slow
def test_lightning_overhead_is_stated(runs):
    assert "Lightning's overhead over the raw loop" in (runs["gpt_tiny"] / "results.md").read_text()


def test_budget_expansion():
    sys.path.insert(0, str(ROOT))
    from benchmarks.registry import expand

    assert expand(["vdnn", "checkpoint", "l2l@10%"], [0.25, 0.5]) == [
        "plain", "vdnn", "vdnn@25%", "vdnn@50%", "checkpoint", "l2l@10%"]


@pytest.mark.parametrize("cases,message", [
    ("plain,bogus", "unknown case 'bogus'; valid cases: plain, lightning_plain"),
    ("plain@50%", "case 'plain' takes no memory budget"),
])
def test_bad_case_names_are_refused(tmp_path, cases, message):
    proc = subprocess.run(RUN + ["--model", "gpt_tiny", "--tiny", "--cases", cases, "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "results.jsonl").exists()
