"""The benchmark suite runs end to end on a CPU (``--tiny``), so that its code cannot rot between GPU runs."""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

GiB = 2**30
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
        "vgg_tiny": _start(outs["vgg_tiny"], "vgg_tiny", VGG_CASES + [CRASHED, "vdnn@50%"], "--fail-case", CRASHED,
                           "--settle", "8", "--switch-interval", "0.001"),
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
        assert row["switch_interval"] == (0.001 if model == "vgg_tiny" else 0.005)  # --switch-interval, or Python's
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


@pytest.mark.slow
def test_hf_llama_workload_trains_under_l2l_and_transformers_checkpointing(tmp_path):
    """``hf_llama_1b`` at its ``--tiny`` size (a 4-block ``transformers`` Llama): the cases that need nothing but the
    model, two steps each, so that the HF workload and its peer cannot rot between GPU runs. Same batch, same seed:
    each case's losses are plain's."""
    pytest.importorskip("transformers")
    output, _ = _start(tmp_path, "hf_llama_1b", ["l2l", "hf_checkpoint"], "--steps", "2", "--warmup", "0"
                       ).communicate(timeout=300)
    rows = _rows(tmp_path)
    for case in ("plain", "l2l", "hf_checkpoint"):
        row = rows[case]
        assert row["status"] == "ok", f"{case}: {row['status']}\n{row.get('traceback', output)}"
        assert row["model"] == "hf_llama_tiny" and len(row["losses"]) == 2 and row["tflops"] > 0
        assert row["losses"] == pytest.approx(rows["plain"]["losses"], rel=1e-5), case
    assert rows["l2l"]["memory_report"]["streamed_h2d_bytes"] > 0


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
    marked = merge([dict(rank([9.0, 1.0], [1.0, 1.0], 1, 1), phases={"forward": {"host_ms": h, "device_ms": None}})
                    for h in (2.0, 3.0)])
    assert marked["phases"]["forward"]["host_ms"] == 2.0  # rank 0's, as the profile
    assert [r["phases"]["forward"]["host_ms"] for r in marked["per_rank"]] == [2.0, 3.0]


def test_a_rank_that_died_is_named():
    sys.path.insert(0, str(ROOT))
    from benchmarks.run import _crash

    torchrun = "Failures:\n[1]:\n  rank : 1\n  exitcode  : 70\nRoot Cause (first observed failure):\n[0]:\n" \
               "  rank      : 0 (local_rank: 0)\n  exitcode  : -9 (pid: 17723)\n"
    assert _crash(1, torchrun) == "signal 9 (killed: host out of memory?) (rank 0)"
    assert _crash(70, "") == "exit 70"


def test_planner_steps_stay_out_of_the_median(runs):
    """``--settle``: the steps the planner measures (profiling, checking its plan) run before the warm-up ends,
    so the median is of the settled plan's steps, as many as asked; a case without a planner is untouched."""
    rows = _rows(runs["vgg_tiny"])
    row, plain = rows["vdnn@50%"], rows["plain"]
    times = row["step_s_all"]
    assert row["planning_steps"] >= 2  # the profiling step and at least one check of the plan
    assert row["warmup_steps"] >= max(2, row["planning_steps"])
    assert len(times) - row["warmup_steps"] == 3  # --tiny's timed steps, after the planner's
    assert row["step_s"] == statistics.median(times[row["warmup_steps"]:])
    assert (plain["warmup_steps"], len(plain["step_s_all"])) == (2, 5)
    assert f"vdnn@50% ({row['warmup_steps']}, " in (runs["vgg_tiny"] / "results.md").read_text()
    assert any(line.startswith("lightning_vdnn auto plan: ") for line in row["log"])  # the plans it made
    import base64
    import pickle

    state = pickle.loads(base64.b64decode(row["planner_inputs"]))  # what it planned from, to solve again
    assert len(state["layers"]) == len(row["memory_report"]["layers"]) and state["budget"] == row["memory_budget"]
    assert state["plan"].predicted_peak == row["memory_report"]["predicted_peak_bytes"]


def test_host_and_device_marks_of_lightning_cases(runs):
    """A Lightning case's row says when the host had queued forward and backward (median of the timed steps);
    on the CPU there is no device clock. A raw loop has no marks."""
    rows = _rows(runs["vgg_tiny"])
    phases = rows["vdnn@50%"]["phases"]
    assert 0 < phases["forward"]["host_ms"] < phases["backward"]["host_ms"] < rows["vdnn@50%"]["step_s"] * 1e3
    assert phases["forward"]["device_ms"] is None
    assert "phases" not in rows["plain"]
    assert "| vdnn@50% | " in (runs["vgg_tiny"] / "results.md").read_text().split("## Host or device first")[1]


def test_phase_medians_leave_out_warmup_and_the_profiled_step():
    sys.path.insert(0, str(ROOT))
    from benchmarks.measure import phase_medians

    phases = [{"forward": (100.0, None)}, {"forward": (1.0, 4.0)}, {"forward": (50.0, 60.0)},
              {"forward": (3.0, 6.0)}, {"forward": (2.0, 5.0), "backward": (7.0, 9.0)}]
    assert phase_medians(phases, warmup=1, profiled=2) == {"forward": {"host_ms": 2.0, "device_ms": 5.0},
                                                           "backward": {"host_ms": 7.0, "device_ms": 9.0}}
    assert phase_medians([{}, {}], warmup=0) == {}


def test_a_run_s_plan_solves_again_the_same(runs, capsys):
    """``benchmarks/replan.py``: the row's planner inputs, solved again with the run's slack and budget, give the
    plan the run took; a lower budget gives a plan within it."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import replan

    results = runs["vgg_tiny"] / "results.jsonl"
    assert replan.main([str(results), "--case", "vdnn@50%"]) == 0
    out = capsys.readouterr().out
    taken, again = (re.search(rf"{name}.*?predicted peak ([\d.]+) MB", out).group(1)
                    for name in ("the run's plan", "solved again"))
    assert taken == again
    assert replan.main([str(results), "--case", "vdnn@50%", "--overcount", "0.5"]) == 0
    assert "forward peak lowered by 0.500 GB" in capsys.readouterr().out  # a CPU run has none: the same plan
    with pytest.raises(SystemExit):
        replan.main([str(results), "--case", "plain"])  # no planner


def test_settled_warmup():
    sys.path.insert(0, str(ROOT))
    from benchmarks.measure import settled_warmup

    assert settled_warmup([], 3) == 3  # a loop that does not know
    assert settled_warmup([True, False, False, False], 3) == 3
    assert settled_warmup([True, True, False, True, True, False], 3) == 5  # a re-plan after the first plan
    with pytest.raises(SystemExit):
        sys.path.insert(0, str(ROOT))
        from benchmarks import run

        run.parse_args(["--tiny", "--settle", "-1", "--out", "/nonexistent"])


def test_budget_expansion():
    sys.path.insert(0, str(ROOT))
    from benchmarks.registry import expand

    assert expand(["vdnn", "checkpoint", "l2l@10%"], [0.25, 0.5]) == [
        "plain", "vdnn", "vdnn@25%", "vdnn@50%", "checkpoint", "l2l@10%"]


def test_vdnn_lean_is_the_planner_with_lean_layers_at_the_budget():
    sys.path.insert(0, str(ROOT))
    from benchmarks.lightning_cases import strategy_for

    lean = strategy_for("vdnn_lean", 2**30)
    assert lean.config.lean_activations and lean.config.activation_offload == "auto"
    assert lean.config.memory_budget == 2**30
    assert not strategy_for("vdnn", 2**30).config.lean_activations


def test_compile_flag_compiles_every_case_s_blocks(tmp_path):
    """``--compile`` reaches each case's process, which compiles the model's blocks (the tree unchanged); the
    table says the ratios are to compiled plain. (A --tiny --compile run on a CPU takes minutes: inductor.)"""
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks import case, run
    from benchmarks.workloads import build, compiled

    args = run.parse_args(["--tiny", "--compile", "--cases", "plain,l2l_mb8", "--out", str(tmp_path)])
    cmd = run.case_command(args, "l2l_mb8", None)
    assert "--compile" in cmd and case.parse_args(cmd[cmd.index("--case"):]).compile
    w = compiled(build("gpt_tiny", torch.device("cpu")))
    assert all(block._compiled_call_impl is not None for block in w.model.blocks)
    assert "ratios are to compiled plain" in " ".join(run._notes([{"case": "plain", "status": "ok", "compiled": True}]))


def test_offload_cost_moves_exactly_the_blocks_each_row_names(tmp_path):
    """``benchmarks/offload_cost.py`` on the CPU: each row offloads its blocks' saves and no others (none: nothing;
    two blocks: twice one block's bytes; blocks the tiny model lacks: left out)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import offload_cost

    out = tmp_path / "rows.json"
    assert offload_cost.main(["--model", "gpt_tiny", "--steps", "1", "--min-offload-bytes", "0", "--json", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())}
    assert list(rows) == [name for name, _ in offload_cost.ROWS]
    one = rows["b0"]["offloaded_bytes"]
    assert rows["none"]["offloaded_bytes"] == 0 == rows["none again"]["offloaded_bytes"] and one > 0
    assert rows["b0-1"]["offloaded_bytes"] == 2 * one and rows["b10-11"]["blocks"] == []
    assert all(r["copy_waits_per_step"] == 0 for r in rows.values())
    with pytest.raises(SystemExit):
        offload_cost.main(["--steps", "0"])


def test_allocator_counts_of_the_timed_steps_and_their_table():
    """The allocator's driver calls summed over the timed steps (warm-up and the profiled step left out), the bytes
    held after the last; the report's table shows them."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.measure import allocator_summary
    from benchmarks.report import allocator_table

    steps = [{"num_device_alloc": n, "num_device_free": f, "num_alloc_retries": 0, "num_sync_all_streams": 0,
              "reserved_bytes": r * GiB} for n, f, r in [(300, 0, 20), (9, 4, 26), (7, 7, 27), (0, 0, 26), (1, 0, 26)]]
    summary = allocator_summary(steps, warmup=1, profiled=2)
    assert summary == {"num_device_alloc": 10, "num_device_free": 4, "num_alloc_retries": 0,
                       "num_sync_all_streams": 0, "reserved_bytes": 26 * GiB}
    assert allocator_summary(steps, warmup=5) == {}
    assert allocator_table([{"case": "plain"}]) == []
    assert "| vdnn@75% | 26.00 | 10 | 4 | 0 |" in allocator_table([{"case": "vdnn@75%", "allocator": summary}])


def test_device_gib_caps_every_case_but_plain(tmp_path):
    """``--device-gib``: each case but plain runs as on a GPU that size (plain, the baseline, has the whole device);
    a size the device does not have, or none, is refused with the size named."""
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks import case, measure, run

    args = run.parse_args(["--tiny", "--device-gib", "27", "--cases", "plain,vdnn", "--out", str(tmp_path)])
    assert "--device-gib" not in run.case_command(args, "plain", None)
    cmd = run.case_command(args, "vdnn@75%", 1)
    assert case.parse_args(cmd[cmd.index("--case"):]).device_gib == 27
    measure.cap_device_memory(torch.device("cpu"), 27)  # no device memory to cap: nothing happens
    with pytest.raises(SystemExit):
        run.parse_args(["--tiny", "--device-gib", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        case.parse_args(["--case", "l2l", "--model", "gpt_tiny", "--switch-interval", "0"])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device-gib 100000"):
            measure.cap_device_memory(torch.device("cuda", 0), 100000)


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


# ---- --profile: one step under torch.profiler (benchmarks/step_profile.py) ----

def _step_profile():
    sys.path.insert(0, str(ROOT))
    from benchmarks import step_profile

    return step_profile


def test_union_merges_overlapping_and_touching_intervals():
    sp = _step_profile()
    assert sp.union([(5, 7), (0, 2), (1, 3), (3, 4), (10, 10)]) == [(0, 4), (5, 7), (10, 10)]
    assert sp.covered([(0, 2), (1, 3), (0, 3)]) == 3  # three streams over the same 3 us count once
    assert sp.union([]) == [] and sp.covered([]) == 0
    with pytest.raises(ValueError, match=r"interval \(3, 1\) ends before it starts"):
        sp.union([(3, 1)])


def test_overlap_of_copies_with_kernels():
    sp = _step_profile()
    kernels = [(0, 10), (5, 15), (20, 30)]  # two streams: busy 0-15 and 20-30
    copies = [(12, 22), (25, 26), (40, 45)]
    assert sp.overlap(copies, kernels) == 3 + 2 + 1  # 12-15, 20-22, 25-26
    assert sp.overlap(kernels, copies) == sp.overlap(copies, kernels)
    assert sp.overlap(copies, []) == 0
    assert sp.clip([(0, 10), (20, 30), (35, 40)], (5, 25)) == [(5, 10), (20, 25)]


def test_device_summary_splits_copies_into_hidden_and_exposed():
    sp = _step_profile()
    s = sp.device_summary(window=(0, 100_000), kernels=[(0, 40_000), (30_000, 50_000)],
                          h2d=[(45_000, 60_000)], d2h=[(55_000, 70_000), (95_000, 120_000)])
    assert s["kernel_ms"] == 50 and s["h2d_ms"] == 15 and s["d2h_ms"] == 20  # d2h clipped at the window's end
    assert s["copy_hidden_ms"] == 5  # 45-50 ms under a kernel
    assert s["copy_exposed_ms"] == 25 + 5 - 5  # copies cover 45-70 and 95-100: 30 ms, 5 of them hidden
    assert s["gpu_idle_ms"] == 100 - 70 - 5  # neither kernels nor copies: 70-95 ms
    assert [sp.copy_direction(n) for n in ("Memcpy HtoD (Pinned -> Device)", "Memcpy DtoH (Device -> Pageable)",
                                           "Memcpy DtoD (Device -> Device)", "ampere_sgemm_128x64_nn")] == \
        ["h2d", "d2h", None, None]


def _event(name, start, end, device="cuda", thread=1, meta="", annotation=False, self_us=0.0):
    """A stand-in for a ``FunctionEvent`` of ``prof.events()``, with the fields the summary reads."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    kind = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
    return SimpleNamespace(name=name, time_range=Interval(start, end), device_type=kind, device_index=0, thread=thread,
                           metadata_json=meta, is_user_annotation=annotation, self_cpu_time_total=self_us)


def test_summary_of_cuda_events():
    """The CUDA side, from events shaped as torch 2.11 gives them on an H200 (names, metadata): copies by
    direction with their bytes, kernels on two streams counted once, ``record_function`` ranges mirrored onto
    the GPU left out; on the host, the backward on the autograd thread, the optimizer on a thread of its own."""
    import torch

    sp = _step_profile()
    meta = '\n      "device": 0, "context": 1,\n      "stream": 7, "correlation": 33,\n      "bytes": {}, ' \
           '"memory bandwidth (GB/s)": 53.5'
    events = [
        _event(sp.STEP_RANGE, 0, 10_000, "cpu"),
        _event("aten::mm", 100, 2_000, "cpu", self_us=1_900),
        _event("autograd::engine::evaluate_function: MmBackward0", 2_000, 6_000, "cpu", thread=2, self_us=500),
        _event("Optimizer.step#AdamW.step", 2_900, 9_100, "cpu", thread=3, self_us=200),
        _event("aten::_fused_adamw_", 3_000, 9_000, "cpu", thread=3, self_us=6_000),
        _event("cudaEventSynchronize", 6_000, 7_000, "cpu", self_us=1_000),
        _event(sp.CLOCK_SYNC_RANGE, 9_000, 10_000, "cpu"),
        _event("cudaDeviceSynchronize", 9_000, 10_000, "cpu", self_us=1_000),  # the clock's own: not counted
        _event("ampere_sgemm_128x64_nn", 1_000, 3_000), _event("void at::native::fill_kernel", 2_000, 4_000),
        _event("Memcpy HtoD (Pinned -> Device)", 3_000, 5_000, meta=meta.format(4_000_000_000)),
        _event("Memcpy DtoH (Device -> Pageable)", 7_000, 8_000, meta=meta.format(1_000_000_000)),
        _event(sp.STEP_RANGE, 1_000, 8_000, annotation=True),  # gpu_user_annotation: spans idle gaps
        _event("Optimizer.step#AdamW.step", 3_000, 9_500),  # the same, told by its host twin's name
    ]
    s = sp.summarize(events, torch.device("cuda", 0), all_threads=True)
    assert s["wall_ms"] == 10 and s["kernel_ms"] == 3 and s["h2d_ms"] == 2 and s["d2h_ms"] == 1
    assert s["h2d_gb"] == 4 and s["d2h_gb"] == 1 and s["pageable_copies"] == 1
    assert s["copy_hidden_ms"] == 1 and s["copy_exposed_ms"] == 2 and s["gpu_idle_ms"] == 10 - 4 - 1
    assert s["sync_ms"] == 1
    assert s["host_outside_ops_ms"] == 2.1  # main and autograd in no op: 0-0.1 and 7-9 ms
    assert s["threads_ms"] == {"main": 2.9, "autograd": 0.5, "thread 3": 6.2}
    assert s["top_ops"][0] == {"name": "aten::_fused_adamw_", "thread": "thread 3", "self_ms": 6.0, "calls": 1}


@pytest.mark.parametrize("step", [-1, 6])
def test_profile_step_out_of_range_is_refused(step):
    sp = _step_profile()
    assert sp.profiled_step(warmup=2, steps=3) == 5  # the extra step after the timed ones
    with pytest.raises(ValueError, match=rf"profile step {step} is out of range: .* give 0 \.\. 5"):
        sp.profiled_step(2, 3, step)
    from benchmarks.measure import ProfileRequest

    if step < 0:
        with pytest.raises(ValueError, match="profile step -1: give a step index, 0 or more"):
            ProfileRequest(step)


def test_a_profiled_step_on_cpu(one_thread):
    """A real step under the profiler, through the clock every case uses: the profiled step is timed but not in
    the median, and its summary names the model's matmuls and the optimizer on the thread that ran it."""
    import threading

    import torch

    from benchmarks.measure import ProfileRequest, StepClock, profiling, summarize

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(32, 64)

    def step() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        worker = threading.Thread(target=opt.step, name="host-optimizer")  # as a host optimizer thread would
        worker.start()
        worker.join()
        return loss.detach()

    with profiling(ProfileRequest(step=2)):
        clock = StepClock(torch.device("cpu"))
    for _ in range(4):
        clock.start()
        clock.stop(step())
    prof = clock.profile
    assert prof is not None and prof["device"] == "cpu" and prof["kernel_ms"] is None
    assert prof["wall_ms"] > 0 and prof["wall_ms"] == pytest.approx(clock.times[2] * 1e3, rel=0.5, abs=1.0)
    assert 0 <= prof["host_outside_ops_ms"] < prof["wall_ms"]
    names = {op["name"] for op in prof["top_ops"]}
    assert names & {"aten::addmm", "aten::mm"}, names
    assert 0 < len(prof["top_ops"]) <= 8
    json.dumps(prof)
    if prof["all_threads"]:  # the optimizer ran on another thread, and is found there
        assert any(t != "main" for t in prof["threads_ms"]), prof["threads_ms"]
    times = [1.0, 1.0, 9.0, 2.0]  # warm-up 1, then the profiled step 2 (slow under the profiler), then 2 timed
    assert summarize(times, 1, 10, 1e12, profiled=2)["step_s"] == 1.5
    assert summarize(times, 1, 10, 1e12)["step_s"] == 2.0


def test_profile_end_to_end(tmp_path):
    """``run.py --tiny --profile`` on one cheap case: the row's summary, its Chrome trace and the second table."""
    out, traces = tmp_path / "out", tmp_path / "traces"
    output, _ = _start(out, "gpt_tiny", ["plain"], "--steps", "2", "--warmup", "1", "--profile",
                       "--trace-dir", str(traces)).communicate(timeout=300)
    row = _rows(out)["plain"]
    assert row["status"] == "ok", output
    assert len(row["step_s_all"]) == 1 + 2 + 1 and row["profile_step"] == 3
    assert row["step_s"] == pytest.approx(statistics.median(row["step_s_all"][1:3]))  # not the profiled step
    assert row["profile"]["wall_ms"] > 0 and row["profile"]["top_ops"]
    assert Path(row["profile"]["trace"]).parent == traces and Path(row["profile"]["trace"]).stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "## Where the step's time goes (one profiled step)" in table
    # no GPU columns on a CPU; the top host op is whichever took longest (an aten op, or the optimizer's step)
    assert re.search(r"\| plain \| [\d.]+ (\|  )+\| [\d.]+ \| \S+ [\d.]+ \(main\)", table), table


@pytest.mark.slow
def test_with_settle_the_profiled_step_is_one_of_the_settled_plan(tmp_path):
    """``--profile`` with ``--settle``: a Lightning case profiles the step after its timed ones, which come after the
    planner's steps, wherever those end; a raw loop profiles its fixed last step. Neither is in the median."""
    out = tmp_path / "out"
    output, _ = _start(out, "vgg_tiny", ["plain", "vdnn@50%"], "--steps", "2", "--warmup", "1", "--settle", "8",
                       "--profile").communicate(timeout=300)
    rows = _rows(out)
    auto, plain = rows["vdnn@50%"], rows["plain"]
    assert auto["status"] == plain["status"] == "ok", output
    assert auto["planning_steps"] >= 2 and auto["warmup_steps"] >= auto["planning_steps"]
    assert auto["profile_step"] == auto["warmup_steps"] + 2 == len(auto["step_s_all"]) - 1
    assert auto["step_s"] == statistics.median(auto["step_s_all"][auto["warmup_steps"]:-1])
    assert auto["profile"]["wall_ms"] > 0
    assert plain["profile_step"] == 3 and len(plain["step_s_all"]) == 4
    note = re.search(r"under torch.profiler \(steps (.*?), not in the median", (out / "results.md").read_text())
    assert note and set(note.group(1).split(", ")) == {"plain 3", f"vdnn@50% {auto['profile_step']}"}


def test_profile_flag_checks_its_step(tmp_path):
    proc = subprocess.run(RUN + ["--model", "gpt_tiny", "--tiny", "--cases", "plain", "--out", str(tmp_path),
                                 "--profile-step", "9"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "profile step 9 is out of range" in proc.stderr


@pytest.mark.slow
def test_largest_model_script_plans_and_trains_the_lean_host_state_on_the_cpu(tmp_path):
    """``--host-state bf16``: bf16 gradients and moments (10 bytes a block parameter, not 16), the plan printed
    before building, and the host state the run holds exactly what the plan counted for the blocks."""
    from conftest import checkout_env

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "largest.py"), "--tiny", "--host-state", "bf16",
                           "--out", str(tmp_path)], cwd=ROOT, env=checkout_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.index("largest: plan") < done.stdout.index("model built")
    row = json.loads((tmp_path / "largest.json").read_text())
    plan = row["plan_bytes"]
    assert row["host_state"] == "bf16" and not row["weight_copies"] and row["losses"][-1] < row["losses"][0]
    assert row["host_state_bytes"] == plan["weights+grads (pinned)"] + plan["moments"]
    assert plan["moments"] == 4 * (row["params"] - row["outside_params"])  # two bf16 moments per block parameter
    assert row["plan_total_bytes"] <= row["available_bytes"] and row["build_s"] > 0


def test_largest_model_script_fine_tunes_with_lora_in_bf16_true_on_the_cpu(tmp_path):
    """``--lora``: the blocks' frozen weights in bf16 (2 bytes each, no gradient or moments), the adapters' state
    beside them, exactly what the plan counted; the same 64 MiB hold several times the fp32 run's blocks."""
    from conftest import checkout_env

    pytest.importorskip("peft")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "largest.py"), "--tiny", "--lora", "4",
                           "--out", str(tmp_path)], cwd=ROOT, env=checkout_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    row = json.loads((tmp_path / "largest.json").read_text())
    plan = row["plan_bytes"]
    assert row["lora_rank"] == 4 and row["host_state"] == "bf16-true, LoRA rank 4" and not row["weight_copies"]
    assert row["host_state_bytes"] == plan["weights+grads (pinned)"] + plan["moments"]
    assert row["losses"][-1] < row["losses"][0] and row["plan_total_bytes"] <= row["available_bytes"]
    assert row["blocks"] > 100  # 2 bytes a block weight: the fp32 run's 64 MiB hold some 20
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "largest.py"), "--tiny", "--lora", "4",
                          "--host-state", "bf16", "--out", str(tmp_path)], cwd=ROOT, env=checkout_env(),
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--lora 4 --host-state bf16" in bad.stderr


@pytest.mark.parametrize("budgets", ["1.5", "0.5,-0.1", "half"])
def test_partitioner_budget_refuses_budgets_outside_zero_to_one(budgets, capsys):
    from benchmarks import partitioner_budget

    with pytest.raises(SystemExit):
        partitioner_budget.main(["--budgets", budgets])
    assert "--budgets" in capsys.readouterr().err
