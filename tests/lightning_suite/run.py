"""Run Lightning's own tests with the plain Trainer, then with our strategies swapped in; print the regressions.

Opt-in, not part of our test run (see ``docs/lightning_contract.md``)::

    git --git-dir=LIGHTNING_GIT archive 2.6.5 tests/tests_pytorch pyproject.toml | tar -x -C /tmp/pl_tests
    python tests/lightning_suite/run.py /tmp/pl_tests --out /tmp/pl_runs

Each pass is one pytest run of ``SELECTION`` under ``tests_pytorch`` with ``VDNN_SWAP`` set (``vdnn_swap.py``),
written as JUnit XML; a regression is a test that passes with the plain Trainer and fails (or errors) with the
swap. Tests that need a GPU skip themselves; the ones that start processes are deselected (``DESELECT``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SELECTION = ("loops", "checkpointing", "trainer/logging_", "trainer/optimization", "callbacks")
#: Tests that start processes (DDP spawn/subprocess launchers, several CPU devices): slow on a shared CPU, and
#: never given our strategy (``vdnn_swap`` swaps one device only), so the plain Trainer runs them either way.
DESELECT = "not ddp and not spawn and not multiprocess and not distributed"


def run_pass(tests: Path, swap: str, out: Path, extra_path: list[str], timeout: int,
             selection: tuple[str, ...] = SELECTION) -> dict:
    """One pytest run of ``selection`` (paths under ``tests_pytorch``) with ``VDNN_SWAP=swap``; its outcome per
    test id."""
    xml = out / f"{swap}.xml"
    env = {**os.environ, "VDNN_SWAP": swap, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), *extra_path])}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "vdnn_swap", "-o", "addopts=",
           "-W", "ignore::DeprecationWarning", "-k", DESELECT, f"--junitxml={xml}",
           *(f"tests_pytorch/{s}" for s in selection)]
    start = time.time()
    with open(out / f"{swap}.log", "w") as log:
        subprocess.run(cmd, cwd=tests / "tests", env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    return {"seconds": round(time.time() - start), "outcomes": outcomes(xml)}


def outcomes(xml: Path) -> dict[str, str]:
    """``classname::name`` -> ``passed``/``failed``/``error``/``skipped`` from a JUnit XML file."""
    result = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        result[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    return result


def failing(outcome: dict[str, str]) -> set[str]:
    return {test for test, kind in outcome.items() if kind in ("failure", "error")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tests", type=Path, help="folder holding Lightning's tests/tests_pytorch")
    parser.add_argument("--out", type=Path, default=Path("lightning_suite_runs"))
    parser.add_argument("--swaps", nargs="+", default=["plain", "vdnn_all", "vdnn"],
                        help="'plain' (the baseline) first, then strategy names")
    parser.add_argument("--extra-path", nargs="*", default=[],
                        help="folders put on PYTHONPATH: test-only packages Lightning's tests import (cloudpickle)")
    parser.add_argument("--select", nargs="+", default=list(SELECTION),
                        help="folders or files under tests_pytorch to run (default: the whole selection)")
    parser.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per pass")
    parser.add_argument("--reuse", action="store_true",
                        help="read a pass's results from --out where its XML is there (passes run apart, in parallel)")
    args = parser.parse_args()
    if not (args.tests / "tests" / "tests_pytorch").is_dir():
        parser.error(f"{args.tests} holds no tests/tests_pytorch: extract Lightning's tests there (see the module "
                     "docstring), from the tag of the installed lightning.__version__.")
    args.out.mkdir(parents=True, exist_ok=True)
    passes = {swap: ({"seconds": 0, "outcomes": outcomes(args.out / f"{swap}.xml")}
                     if args.reuse and (args.out / f"{swap}.xml").exists()
                     else run_pass(args.tests, swap, args.out, args.extra_path, args.timeout,
                              tuple(args.select))) for swap in args.swaps}
    base = failing(passes[args.swaps[0]]["outcomes"])
    summary = {"baseline": args.swaps[0], "baseline_failures": sorted(base)}
    for swap, result in passes.items():
        runs = result["outcomes"]
        summary[swap] = {"seconds": result["seconds"], "tests": len(runs),
                         "skipped": sum(kind == "skipped" for kind in runs.values()), "failures": len(failing(runs)),
                         "regressions": sorted(failing(runs) - base), "fixed": sorted(base - failing(runs))}
        print(f"{swap}: {len(runs)} tests, {summary[swap]['skipped']} skipped, {len(failing(runs))} failing, "
              f"{len(summary[swap]['regressions'])} regressions vs {args.swaps[0]} ({result['seconds']} s)")
        for test in summary[swap]["regressions"]:
            print(f"    {test}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
