"""A small CNN digit classifier: logits for class scores, penultimate features for feature distances."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 20
    in_channels: int = 1
    width: int = 32
    feature_dim: int = 128
    num_classes: int = 10

    def to_dict(self) -> dict:
        return asdict(self)


class DigitClassifier(nn.Module):
    """Two conv stages (each two 3x3 convs and a 2x2 max-pool), a feature layer and a linear head."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w, c = config.width, config.in_channels

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(),
                    nn.MaxPool2d(2)]

        side = config.image_size // 4
        self.trunk = nn.Sequential(*stage(c, w), *stage(w, 2 * w), nn.Flatten(),
                                   nn.Linear(2 * w * side * side, config.feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (batch, feature_dim) of images in [-1, 1]."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))
