"""Pictures a person looks at: image grids (matplotlib only; no torchvision)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from recache.errors import RecacheError  # noqa: E402
from recache.io import atomic_path  # noqa: E402


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1) -> torch.Tensor:
    """Tile (N, C, H, W) images in [-1, 1] into one (H', W') or (H', W', C) array in [0, 1], ``nrow`` per row."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return grid[0] if c == 1 else grid.permute(1, 2, 0)


IMAGE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", "": "png"}


def image_format(path: str | os.PathLike) -> str:
    """The image format a file name asks for by its suffix (PNG without one), or a ``RecacheError`` naming the
    ones there are."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise RecacheError(f"cannot tell an image format from {str(path)[:200]!r}: end the name with "
                           f"{', '.join(s for s in IMAGE_FORMATS if s)}")
    return IMAGE_FORMATS[suffix]


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int, scale: int = 4) -> None:
    """Save a grid image (PNG or JPEG, by the suffix), each pixel repeated ``scale`` times so small digits are
    easy to see."""
    grid = image_grid(images, nrow)
    grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    with atomic_path(path) as tmp:
        plt.imsave(tmp, grid.numpy(), cmap="gray", vmin=0, vmax=1, format=image_format(path))
