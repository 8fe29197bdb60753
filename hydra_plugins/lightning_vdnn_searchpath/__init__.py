"""Hydra discovers this package (``hydra_plugins`` is a namespace package) and loads its SearchPathPlugin."""
