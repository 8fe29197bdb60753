"""VGG (Simonyan & Zisserman, 2014), the network the vDNN paper offloads activations for.

Its conv activations are large and its weights small, the opposite of a transformer, which makes it the
reference workload for activation offload. Layout and init follow torchvision's ``vgg16``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Union

import torch
import torch.nn as nn
from torch import Tensor

Layer = Union[int, str]
VGG16_LAYERS: tuple[Layer, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip

_CONFIGS: dict[str, dict[str, Any]] = {
    "vgg16": dict(),
    "vgg16_bn": dict(batch_norm=True),
    "vgg_tiny": dict(layers=(16, 16, "M", 32, 32, "M", 64, 64, "M"), image_size=32, hidden=128, num_classes=10),
}


@dataclass(frozen=True)
class VGGConfig:
    """Conv stack (``int`` = 3x3 conv with that many channels, ``"M"`` = 2x2 max-pool) and classifier."""

    layers: tuple[Layer, ...] = VGG16_LAYERS
    batch_norm: bool = False
    num_classes: int = 1000
    image_size: int = 224
    hidden: int = 4096
    dropout: float = 0.5
    in_channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))  # lists from YAML/CLI become tuples
        for layer in self.layers:
            if layer != "M" and not (isinstance(layer, int) and not isinstance(layer, bool) and layer > 0):
                raise ValueError(f"layers entry {layer!r} must be a positive channel count or 'M'.")
        if not any(layer != "M" for layer in self.layers):
            raise ValueError(f"layers={self.layers!r} has no conv layer.")
        for name in ("num_classes", "image_size", "hidden", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if self.pooled_size < 1:
            raise ValueError(f"image_size={self.image_size} is too small for {self.layers.count('M')} max-pools.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1).")

    @property
    def out_channels(self) -> int:
        return [layer for layer in self.layers if layer != "M"][-1]  # type: ignore[return-value]

    @property
    def pooled_size(self) -> int:
        """Spatial size after the conv stack, which the classifier is built for (7 for VGG-16 at 224)."""
        return self.image_size // 2 ** self.layers.count("M")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "VGGConfig":
        """A named preset (see ``VGGConfig.names()``) with optional field overrides."""
        if name not in _CONFIGS:
            raise ValueError(f"Unknown VGG config {name!r}; valid names: {', '.join(cls.names())}.")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown VGGConfig fields {sorted(unknown)}.")
        return cls(**{**_CONFIGS[name], **overrides})

    @staticmethod
    def names() -> list[str]:
        return list(_CONFIGS)


def _features(config: VGGConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = config.in_channels
    for layer in config.layers:
        if layer == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(channels, int(layer), kernel_size=3, padding=1))
        if config.batch_norm:
            layers.append(nn.BatchNorm2d(int(layer)))
        layers.append(nn.ReLU(inplace=True))
        channels = int(layer)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """``features`` (conv stack) -> ``avgpool`` -> flatten -> ``classifier`` (3 Linear layers)."""

    def __init__(self, config: VGGConfig) -> None:
        super().__init__()
        self.config = config
        s = config.pooled_size
        self.features = _features(config)
        self.avgpool = nn.AdaptiveAvgPool2d((s, s))
        self.classifier = nn.Sequential(
            nn.Linear(config.out_channels * s * s, config.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.num_classes),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming convs (fan_out, as torchvision) and hidden linears (fan_in), N(0, 0.01) output layer.

        torchvision's N(0, 0.01) for *every* linear starves the conv stack of gradient without
        BatchNorm; Kaiming hidden layers let plain VGG learn from the first steps at lr 0.05.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier[-1].weight, 0.0, 0.01)  # start at uniform predictions

    def forward(self, x: Tensor) -> Tensor:
        """``x[B, C, H, W]`` images -> ``logits[B, num_classes]``."""
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self, training: bool = True) -> int:
        """Model FLOPs per image at ``config.image_size``: 2 x multiply-adds of convs and linears,
        times 3 for a training step (backward costs about twice the forward)."""
        c, size, channels, macs = self.config, self.config.image_size, self.config.in_channels, 0
        for layer in c.layers:
            if layer == "M":
                size //= 2
            else:
                macs += channels * int(layer) * 9 * size * size
                channels = int(layer)
        macs += sum(m.in_features * m.out_features for m in self.classifier if isinstance(m, nn.Linear))
        return 2 * macs * (3 if training else 1)
