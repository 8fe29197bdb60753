"""Hydra configuration: the YAML groups in this folder, and the schema that checks the strategy group."""

from lightning_vdnn.conf.schema import register

register()
