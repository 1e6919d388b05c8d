"""Per-sample distances between a cached sample and the uncached one from the same noise and condition."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; capped so that tables and JSON stay finite


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``||x - ref|| / ||ref||`` per sample, on the raw sampler output."""
    return (x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-12)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) / 2).float()


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per sample, images mapped from [-1, 1] to [0, 1] (torchmetrics), capped at ``PSNR_CAP_DB``."""
    value = peak_signal_noise_ratio(_unit(x), _unit(ref), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return value.nan_to_num(PSNR_CAP_DB, posinf=PSNR_CAP_DB).clamp(max=PSNR_CAP_DB)


def ssim(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """SSIM per sample (torchmetrics), with a 7x7 Gaussian window (sigma 1) to suit 20x20 digits."""
    return structural_similarity_index_measure(_unit(x), _unit(ref), data_range=1.0, kernel_size=7, sigma=1.0,
                                               reduction="none")
