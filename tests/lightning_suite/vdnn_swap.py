"""A pytest plugin that runs Lightning's own tests with one of our strategies in place of the Trainer's default.

Not one of our tests (pytest collects ``test_*.py`` only): ``run.py`` loads it with ``-p vdnn_swap`` into
Lightning's ``tests_pytorch``. ``VDNN_SWAP`` names the strategy (``vdnn_all``, ``vdnn``; empty or ``plain``: no
swap, the baseline). A ``Trainer`` gets it only where the test left the choice to Lightning: no strategy (or
``"auto"``), a CPU accelerator (or ``"auto"`` with no GPU, real or mocked), one device, one node. A test that
picks its strategy, accelerator or device count tests that choice, not ours.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

SWAP = os.environ.get("VDNN_SWAP", "").strip()
_ONE_DEVICE = (None, "auto", 1, "1", -1, "-1")


def _gpu_available() -> bool:
    """What ``accelerator="auto"`` would see, including Lightning's tests' mocks (``cuda_count_1`` etc.)."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    return CUDAAccelerator.is_available() or MPSAccelerator.is_available()


def _ours(kwargs: dict[str, Any]) -> bool:
    strategy, accelerator = kwargs.get("strategy", "auto"), kwargs.get("accelerator", "auto")
    if not (isinstance(strategy, str) and strategy == "auto"):
        return False
    if accelerator not in ("auto", "cpu") or (accelerator == "auto" and _gpu_available()):
        return False
    return kwargs.get("devices", "auto") in _ONE_DEVICE and kwargs.get("num_nodes", 1) == 1


def pytest_configure(config: Any) -> None:
    if SWAP in ("", "plain"):
        return
    import lightning.pytorch as pl

    importlib.import_module("lightning_vdnn")  # registers the strategy names

    original = pl.Trainer.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if not args and _ours(kwargs):  # the Trainer takes its arguments by keyword (``_defaults_from_env_vars``)
            kwargs["strategy"] = SWAP
        original(self, *args, **kwargs)

    pl.Trainer.__init__ = __init__


def pytest_report_header(config: Any) -> str:
    return f"vdnn_swap: Trainer(strategy='auto') -> {SWAP or 'plain (no swap)'}"
