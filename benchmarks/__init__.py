"""The benchmark suite: every speed or memory claim of lightning_vdnn, measured next to the alternatives.

``python benchmarks/run.py --help`` is the entry point; see ``benchmarks/README.md``.
"""
