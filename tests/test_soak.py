"""The soak script runs on a CPU (``--tiny``), and what it writes adds up, so it cannot rot between GPU runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import soak  # noqa: E402

MiB = 2**20


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("soak")
    code = soak.main(["--tiny", "--steps", "20", "--every", "5", "--out", str(out)])
    data = json.loads((out / "soak.json").read_text())
    return code, data, (out / "soak.md").read_text()


def test_samples_every_k_steps_with_a_steady_state(result):
    _, data, _ = result
    assert (data["model"], data["device"], data["steps"], data["every"]) == ("gpt_tiny", "cpu", 20, 5)
    assert list(data["runs"]) == ["l2l", "vdnn_all"]
    for name, run in data["runs"].items():
        samples = run["samples"]
        assert [s["step"] for s in samples] == [5, 10, 15, 20], name
        assert all(s["host_rss_bytes"] > 100 * MiB for s in samples)
        assert all(s["device_allocated_bytes"] is None and s["device_reserved_bytes"] is None for s in samples)
    l2l, vdnn = data["runs"]["l2l"]["samples"], data["runs"]["vdnn_all"]["samples"]
    # every step moves the same bytes, and the activation pool, once warm, allocates nothing more
    assert len({s["streamed_h2d_bytes"] for s in l2l}) == 1 and l2l[0]["streamed_h2d_bytes"] > 0
    assert len({s["offloaded_bytes"] for s in vdnn}) == 1 and vdnn[0]["offloaded_bytes"] > 0
    assert len({s["host_pool_bytes"] for s in vdnn}) == 1 and vdnn[0]["host_pool_bytes"] >= vdnn[0]["offloaded_bytes"]


def test_summary_and_table_agree_with_the_samples(result):
    code, data, md = result
    tolerance = data["tolerance_bytes"]
    assert tolerance == 32 * MiB
    flat = []
    for name, run in data["runs"].items():
        summary, samples = run["summary"], run["samples"]
        assert summary["finite_loss"] and summary["device_allocated_bytes"] is None
        assert f"| {name} | device_allocated_bytes | n/a | n/a | n/a | n/a | n/a |" in md
        for metric in ("host_rss_bytes", "host_pool_bytes"):
            values, m = [s[metric] for s in samples], summary[metric]
            assert (m["first"], m["last"]) == (values[0], values[-1])
            assert m["growth"] == values[-1] - values[0] and m["max_growth"] == max(values) - values[0]
            assert m["max_growth"] >= m["growth"] and m["flat"] == (m["growth"] <= tolerance)
            cells = " | ".join(f"{m[k] / MiB:.1f}" for k in ("first", "last", "growth", "max_growth"))
            assert f"| {name} | {metric} | {cells} | {'yes' if m['flat'] else 'NO'} |" in md
        assert summary["flat"] == (summary["host_rss_bytes"]["flat"] and summary["host_pool_bytes"]["flat"])
        flat.append(summary["flat"])
    assert code == (0 if all(flat) else 1)
    assert md.startswith("Memory over the run (MiB; flat = last within 32 MiB of first)")


def test_too_few_steps_for_two_samples_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        soak.parse_args(["--tiny", "--steps", "5", "--every", "5", "--out", "unused"])
    assert exc.value.code == 2
    assert "--steps=5 --every=5: need every >= 1 and at least two samples" in capsys.readouterr().err
