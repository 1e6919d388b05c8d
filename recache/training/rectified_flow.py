"""The training loop both embedded generators share (minRF-style rectified flow, Liu et al. 2022).

Per update: a batch of training digits, labels dropped to the null class with probability ``label_dropout`` (for
classifier-free guidance), ``loss(model, x0, y, generator)``, AdamW with linear warm-up and a cosine decay to 10 %,
gradient clipping at 1, and an EMA of the weights (what is saved). A checkpoint every ``checkpoint_every`` updates
lets an interrupted run resume where it stopped, with the same data order.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from recache.checkpoint import load_checkpoint, save_checkpoint
from recache.data import load_mnist

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class FitResult:
    ema: nn.Module
    losses: list[float]
    wall_time_s: float
    heldout_loss: float  # the loss of the EMA weights on the 1,000 test digits (one fixed draw of noise and sigma)

    @property
    def final_train_loss(self) -> float:
        return sum(self.losses[-100:]) / len(self.losses[-100:])


def fit(model: nn.Module, loss: Loss, null_class: int, checkpoint: Path, steps: int, batch_size: int, lr: float,
        warmup: int, ema_decay: float, label_dropout: float, seed: int, resume: bool, checkpoint_every: int,
        desc: str) -> FitResult:
    """Train ``model`` on the training digits; returns its EMA (in eval mode) and the run's figures."""
    images, labels = load_mnist("train")
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    start, losses, elapsed = 0, [], 0.0
    if resume and checkpoint.is_file():
        start, extra = load_checkpoint(checkpoint, {"model": model, "ema": ema}, opt, {"data": gen})
        losses, elapsed = extra["losses"], extra["elapsed"]
    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        y = torch.where(torch.rand(batch_size, generator=gen) < label_dropout, null_class, labels[idx])
        value = loss(model, images[idx], y, gen)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - min(ema_decay, (step + 1) / (step + 10)))
        losses.append(value.item())
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(checkpoint, {"model": model, "ema": ema}, opt, {"data": gen}, step + 1,
                            {"losses": losses, "elapsed": time.perf_counter() - t0})
    wall = time.perf_counter() - t0
    ema.eval()
    test_images, test_labels = load_mnist("test")
    with torch.no_grad():
        heldout = loss(ema, test_images, test_labels, torch.Generator().manual_seed(12345)).item()
    return FitResult(ema, losses, wall, heldout)
