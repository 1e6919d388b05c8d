"""Metrics measured against the uncached output from the same noise and condition."""

from recache.metrics.classifier import classifier_scores
from recache.metrics.fidelity import psnr, relative_l2, ssim
from recache.metrics.paired import mean_and_se, paired_difference

__all__ = ["classifier_scores", "mean_and_se", "paired_difference", "psnr", "relative_l2", "ssim"]
