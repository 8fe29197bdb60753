"""An N-device run against the one-device run of the same cases: per-GPU throughput ratio, peaks, loss curves.

    python benchmarks/scaling.py --one bench_out/gpt_1b_x1 --many bench_out/gpt_1b_x2

Reads both folders' ``results.jsonl`` (written by ``run.py --devices 1`` and ``--devices N``), prints a table
and writes it to ``<many>/scaling.md``. Every rank trains on the one-device batch, so a mode that scales keeps
its per-GPU throughput (ratio near 1) and its loss curve (largest relative difference near 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

GiB = 2**30
COLUMNS = ("case", "status ({n})", "per-GPU {unit}/s, 1", "per-GPU {unit}/s, {n}", "per GPU {n} / 1",
           "peak alloc GiB, 1", "peak alloc GiB (max GPU), {n}", "loss: largest relative difference")


def _rows(folder: Path) -> dict[str, dict]:
    path = folder / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give the --out folder of a finished run.py run.")
    return {row["case"]: row for row in map(json.loads, path.read_text().splitlines())}


def loss_difference(one: Optional[list], many: Optional[list]) -> Optional[float]:
    """The largest ``|many - one| / |one|`` over the steps both recorded; None if either recorded none."""
    if not one or not many:
        return None
    return max(abs(b - a) / max(abs(a), 1e-12) for a, b in zip(one, many))


def compare(one: dict[str, dict], many: dict[str, dict]) -> list[dict]:
    """One entry per case of the N-device run that also ran on one device."""
    out = []
    for case, m in many.items():
        o = one.get(case)
        if o is None:
            continue
        both = o.get("status") == m.get("status") == "ok"
        out.append({"case": case, "status": m.get("status", "?"), "one": o.get("items_per_s"),
                    "many": m.get("items_per_s"), "ratio": m["items_per_s"] / o["items_per_s"] if both else None,
                    "peak_one": o.get("peak_alloc_bytes"), "peak_many": m.get("peak_alloc_bytes"),
                    "loss_diff": loss_difference(o.get("losses"), m.get("losses")) if both else None})
    return out


def _num(value: Optional[float], fmt: str, scale: float = 1.0) -> str:
    return "" if value is None else format(value / scale, fmt)


def markdown(entries: list[dict], devices: int, unit: str) -> str:
    cols = [c.format(unit=unit, n=devices) for c in COLUMNS]
    lines = [f"{devices} devices against 1, same cases, same per-device batch.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for e in entries:
        cells = [e["case"], e["status"].replace("|", "/").splitlines()[0][:80], _num(e["one"], ",.0f"),
                 _num(e["many"], ",.0f"), _num(e["ratio"], ".3f"), _num(e["peak_one"], ".2f", GiB),
                 _num(e["peak_many"], ".2f", GiB), _num(e["loss_diff"], ".2e")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", type=Path, required=True, help="the --out folder of the --devices 1 run")
    p.add_argument("--many", type=Path, required=True, help="the --out folder of the --devices N run")
    args = p.parse_args(argv)
    try:
        one, many = _rows(args.one), _rows(args.many)
    except FileNotFoundError as exc:
        p.error(str(exc))
    devices = max((r.get("devices") or 1 for r in many.values()), default=1)
    unit = next((r["unit"] for r in many.values() if r.get("unit")), "items")
    text = markdown(compare(one, many), devices, unit)
    (args.many / "scaling.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
