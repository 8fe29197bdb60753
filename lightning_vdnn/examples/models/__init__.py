"""Reference models: a GPT/Llama transformer (weight-heavy) and VGG (activation-heavy)."""

from lightning_vdnn.examples.models.gpt import GPT, Block, GPTConfig
from lightning_vdnn.examples.models.vgg import VGG, VGGConfig

__all__ = ["GPT", "GPTConfig", "Block", "VGG", "VGGConfig"]
