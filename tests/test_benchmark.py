"""The benchmark suite runs end to end on a CPU (``--tiny``), so that its code cannot rot between GPU runs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "benchmarks" / "run.py")]
# Cases that must work on a CPU; the others are exercised only for how they fail.
GPT_CASES = ["plain", "lightning_plain", "checkpoint", "vdnn_all", "vdnn_zero3", "l2l_lean"]
VGG_CASES = ["plain", "save_on_cpu", "fsdp2_offload", "vdnn_all_c4"]
CRASHED = "checkpoint"
# --devices 2: the comparison (DDP plain, DeepSpeed's ZeRO-3 offload, ours), and a single-device strategy
DP_CASES, SINGLE_DEVICE = ["plain", "zero3_offload", "vdnn_zero3"], "vdnn_all"


def _start(out: Path, model: str, cases: list[str], *extra: str) -> subprocess.Popen:
    cmd = RUN + ["--tiny", "--model", model, "--cases", ",".join(cases), "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Both tiny suites, run side by side (each case is a process of its own; two cores are enough)."""
    outs = {m: tmp_path_factory.mktemp(m) for m in ("gpt_tiny", "vgg_tiny")}
    procs = {
        "gpt_tiny": _start(outs["gpt_tiny"], "gpt_tiny", GPT_CASES),
        "vgg_tiny": _start(outs["vgg_tiny"], "vgg_tiny", VGG_CASES + [CRASHED, "vdnn@50%"], "--fail-case", CRASHED),
    }
    for model, proc in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{model} suite failed:\n{output}"
    return outs


@pytest.fixture(scope="module")
def dp_run(runs, tmp_path_factory) -> Path:
    """The GPT suite on two gloo ranks per case (after the one-device runs: two cores are taken until then)."""
    out = tmp_path_factory.mktemp("gpt_tiny_x2")
    output, _ = _start(out, "gpt_tiny", DP_CASES + [SINGLE_DEVICE], "--devices", "2").communicate(timeout=300)
    assert "wrote" in output, output
    return out


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


@pytest.mark.slow
def test_data_parallel_cases_measured_on_two_ranks(runs, dp_run):
    """Each case on 2 ranks with the one-device batch each: per-device and total throughput, and the loss curve
    of the one-device run (every rank holds the same batch, so the averaged gradient is one device's)."""
    rows, one_device = _rows(dp_run), _rows(runs["gpt_tiny"])
    for case in DP_CASES:
        row = rows[case]
        assert row["status"] == "ok", f"{case}: {row['status']}\n{row.get('traceback', row.get('output_tail'))}"
        assert row["devices"] == 2 and len(row["per_rank"]) == 2
        assert len(row["step_s_all"]) == len(row["losses"]) == 2 + 3
        assert row["step_s"] > 0 and row["items_per_s_total"] == pytest.approx(2 * row["items_per_s"])
        assert row["host_rss_bytes"] == sum(r["host_rss_bytes"] for r in row["per_rank"])
        assert row["step_s"] >= max(r["step_s"] for r in row["per_rank"])  # per step, the slowest rank
    for case in ("plain", "vdnn_zero3"):
        assert rows[case]["losses"] == pytest.approx(one_device[case]["losses"], rel=1e-5), case
    scaling = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--one",
                              str(runs["gpt_tiny"]), "--many", str(dp_run)], capture_output=True, text=True, timeout=60)
    assert scaling.returncode == 0, scaling.stderr
    assert "| per-GPU tokens/s, 1 | per-GPU tokens/s, 2 | per GPU 2 / 1 |" in scaling.stdout
    assert re.search(r"\| vdnn_zero3 \| ok \| [\d,]+ \| [\d,]+ \| \d\.\d{3} \| .*\| \d\.\d\de[+-]\d\d \|", scaling.stdout)
    assert (dp_run / "scaling.md").read_text() == scaling.stdout
    assert rows["plain"]["losses"][-1] < rows["plain"]["losses"][0]  # it trains
    assert rows["plain"]["time_ratio"] == pytest.approx(1.0)
    assert rows[SINGLE_DEVICE]["status"].startswith("n/a: single-device strategy")
    table = (dp_run / "results.md").read_text()
    assert "on 2 x cpu (data parallel)" in table and "| tokens/s per GPU | tokens/s total |" in table
    assert all(f"| {case} | ok |" in table for case in DP_CASES)


def test_ranks_merge_into_one_row():
    """Slowest rank per step, largest device peak, summed host RSS, mean loss."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.parallel import merge

    def rank(times, losses, peak, rss):
        return {"case": "plain", "status": "ok", "warmup": 1, "items_per_step": 100, "flops_per_step": 1e12,
                "step_s_all": times, "step_s": times[-1], "losses": losses, "peak_alloc_bytes": peak,
                "peak_reserved_bytes": peak, "host_rss_bytes": rss}

    row = merge([rank([9.0, 1.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0], 10, 5),
                 rank([9.0, 3.0, 1.0, 1.0], [6.0, 5.0, 4.0, 3.0], 30, 7)])
    assert row["step_s_all"] == [9.0, 3.0, 2.0, 1.0] and row["step_s"] == 2.0  # median of [3, 2, 1]
    assert row["items_per_s"] == 50 and row["items_per_s_total"] == 100 and row["tflops"] == 0.5
    assert row["losses"] == [5.0, 4.0, 3.0, 2.0]
    assert (row["peak_alloc_bytes"], row["host_rss_bytes"], row["host_rss_max_rank_bytes"]) == (30, 12, 7)
    assert row["devices"] == 2 and [r["peak_alloc_bytes"] for r in row["per_rank"]] == [10, 30]


def test_a_rank_that_died_is_named():
    sys.path.insert(0, str(ROOT))
    from benchmarks.run import _crash

    torchrun = "Failures:\n[1]:\n  rank : 1\n  exitcode  : 70\nRoot Cause (first observed failure):\n[0]:\n" \
               "  rank      : 0 (local_rank: 0)\n  exitcode  : -9 (pid: 17723)\n"
    assert _crash(1, torchrun) == "signal 9 (killed: host out of memory?) (rank 0)"
    assert _crash(70, "") == "exit 70"


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
