"""Train a model with lightning_vdnn, configured by Hydra.

    python recipes/train.py                                   # the default: byte-level GPT on stdlib source
    python recipes/train.py strategy=vdnn_conv model=gpt_small trainer.max_steps=50
    python recipes/train.py model=vgg data=images strategy=vdnn_all
    python recipes/train.py strategy=plain                    # Lightning's default, for comparison

The configuration tree lives in the package (``lightning_vdnn/conf``), so the same command works from a
checkout or a pip install. Read it top to bottom: data, model, strategy, trainer, fit, report.
"""

from __future__ import annotations

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import lightning_vdnn  # noqa: F401  (registers the strategy names)


def build_strategy(cfg: DictConfig):
    """A strategy object from ``_target_``, or a registered name (``name: auto`` for Lightning's default)."""
    return instantiate(cfg) if "_target_" in cfg else cfg.name


@hydra.main(version_base="1.3", config_path="pkg://lightning_vdnn.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed)
    strategy = build_strategy(cfg.strategy)  # bad strategy arguments fail here, before any data is loaded
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    trainer = instantiate(cfg.trainer, strategy=strategy)
    trainer.fit(model, datamodule=datamodule)
    if cfg.report and hasattr(trainer.strategy, "memory_report"):
        print(trainer.strategy.memory_report())


if __name__ == "__main__":
    main()
