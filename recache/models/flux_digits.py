"""``mnist-flux``: a small, trained ``diffusers.FluxTransformer2DModel`` on the project's 20x20 digits, and
``FluxDigitsPipeline``, which samples it through a real ``diffusers.FluxPipeline``.

There is no VAE and no text encoder: an image (1, 20, 20) in [-1, 1] *is* the latent, packed by FLUX's 2x2
packing into 100 tokens of 4 channels (``FluxPipeline._pack_latents``), and a class is a learned table of
``prompt_embeds`` (``TEXT_TOKENS`` tokens) and ``pooled_prompt_embeds`` (``ClassEmbeddings``, class 10 = null class
for true classifier-free guidance). FluxPipeline is told ``height = width = 160``: with its default
``vae_scale_factor`` 8 (no VAE), that is the 20x20 latent. Its scheduler is the default
``FlowMatchEulerDiscreteScheduler()``: sigmas ``linspace(1, 1/T, T)`` then 0, no shift, ``x <- x + (s' - s) v``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from recache.errors import RecacheError
from recache.io import check_regular, read_json, write_json, write_safetensors
from recache.protocol import check_pairs

MODEL_ID = "mnist-flux"
WEIGHTS = Path(__file__).parent / "weights" / MODEL_ID
LATENT_SIZE = 20  # = image size: the image is the latent
PIXEL_SIZE = LATENT_SIZE * 8  # FluxPipeline's height/width; vae_scale_factor is 8 when vae is None
TEXT_TOKENS = 4
NUM_CLASSES = 10  # class 10 is the null class
TRANSFORMER_CONFIG = {
    "patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 3, "attention_head_dim": 32,
    "num_attention_heads": 3, "joint_attention_dim": 64, "pooled_projection_dim": 64, "guidance_embeds": False,
    "axes_dims_rope": [8, 12, 12],
}


class ClassEmbeddings(nn.Module):
    """A learned table standing in for FLUX's two text encoders: class ``y`` (0-9, 10 = null) gives
    ``prompt_embeds`` (B, n_tokens, joint_attention_dim) and ``pooled_prompt_embeds`` (B, pooled_projection_dim)."""

    def __init__(self, num_classes: int = NUM_CLASSES, n_tokens: int = TEXT_TOKENS, joint_attention_dim: int = 64,
                 pooled_projection_dim: int = 64):
        super().__init__()
        self.num_classes, self.null_class = num_classes, num_classes
        self.tokens = nn.Parameter(torch.randn(num_classes + 1, n_tokens, joint_attention_dim))
        self.pooled = nn.Parameter(torch.randn(num_classes + 1, pooled_projection_dim))

    @property
    def config(self) -> dict:
        n, t, j = self.tokens.shape
        return {"num_classes": n - 1, "n_tokens": t, "joint_attention_dim": j,
                "pooled_projection_dim": self.pooled.shape[1]}

    def forward(self, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[classes], self.pooled[classes]


def new_transformer(config: dict | None = None, zero_init: bool = True):
    """A ``FluxTransformer2DModel`` from ``config``; ``zero_init`` zeroes every adaLN modulation and the output
    projection (adaLN-Zero, Peebles & Xie 2023), so each block starts as the identity and the model outputs 0."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**(config or TRANSFORMER_CONFIG))
    if zero_init:
        layers = [m for b in model.transformer_blocks for m in (b.norm1.linear, b.norm1_context.linear)]
        layers += [b.norm.linear for b in model.single_transformer_blocks] + [model.norm_out.linear, model.proj_out]
        for layer in layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    return model


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, 20, 20) images -> (B, 100, 4) FLUX tokens: token (i, j) holds the 2x2 patch at (2i, 2j), channel-major."""
    from diffusers import FluxPipeline

    b, c, h, w = images.shape
    return FluxPipeline._pack_latents(images, b, c, h, w)


def unpack(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack``: (B, 100, 4) -> (B, 1, 20, 20)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(latents, PIXEL_SIZE, PIXEL_SIZE, 8)


def position_ids(n_tokens: int = TEXT_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(img_ids, txt_ids)`` as FluxPipeline builds them: image token (i, j) -> (0, i, j) on the 10x10 grid,
    text -> 0."""
    from diffusers import FluxPipeline

    half = LATENT_SIZE // 2
    return FluxPipeline._prepare_latent_image_ids(1, half, half, "cpu", torch.float32), torch.zeros(n_tokens, 3)


def velocity(transformer, embeddings: ClassEmbeddings, latents: torch.Tensor, sigma: torch.Tensor,
             classes: torch.Tensor) -> torch.Tensor:
    """The flow velocity ``noise - x0`` at packed ``latents`` and noise level ``sigma`` (B,) in [0, 1], called as
    FluxPipeline calls it: ``timestep = t / 1000 = sigma`` (the transformer multiplies by 1000 itself)."""
    prompt, pooled = embeddings(classes)
    img_ids, txt_ids = position_ids(prompt.shape[1])
    return transformer(hidden_states=latents, timestep=sigma, encoder_hidden_states=prompt, pooled_projections=pooled,
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


def make_flux_pipeline(transformer):
    """A real ``FluxPipeline`` with only a transformer and the default flow-matching Euler scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve(name_or_folder: str | os.PathLike = MODEL_ID) -> Path:
    folder = WEIGHTS if os.fspath(name_or_folder) == MODEL_ID else Path(name_or_folder)
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "class_embeddings.safetensors", "recache.json"):
        if not (folder / name).is_file():
            raise RecacheError(f"Flux digits model {os.fspath(name_or_folder)!r}: {folder / name} is missing "
                               f"(use {MODEL_ID!r} or a folder written by 'recache pretrain flux')")
    return folder


def save_flux_digits(folder: str | os.PathLike, transformer, embeddings: ClassEmbeddings, metadata: dict) -> None:
    """Write the transformer in diffusers format (``save_pretrained``), ``class_embeddings.safetensors`` and
    ``recache.json``; each file is moved into place whole (atomic), never pickled."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".save-") as tmp:
        transformer.save_pretrained(tmp, safe_serialization=True)
        config = json.loads((Path(tmp) / "config.json").read_text())
        config.pop("_name_or_path", None)  # where it was loaded from: a path of the machine that saved it
        (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            os.chmod(Path(tmp) / name, 0o666 & ~umask)
            os.replace(Path(tmp) / name, folder / name)
    write_safetensors(folder / "class_embeddings.safetensors", embeddings.state_dict())
    write_json(folder / "recache.json", {"class_embeddings": embeddings.config, **metadata})


def load_flux_digits(name_or_folder: str | os.PathLike = MODEL_ID) -> tuple[object, ClassEmbeddings, dict]:
    """``(transformer, class_embeddings, recache.json)`` of a saved model, both modules in eval mode."""
    from diffusers import FluxTransformer2DModel

    folder = resolve(name_or_folder)
    meta = read_json(folder / "recache.json", "Flux digits metadata")
    check_regular(folder / "class_embeddings.safetensors", "class embeddings")
    try:
        embeddings = ClassEmbeddings(**meta["class_embeddings"])
        embeddings.load_state_dict(load_file(str(folder / "class_embeddings.safetensors")))
        transformer = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float32, low_cpu_mem_usage=False,
                                                             use_safetensors=True)
    except (KeyError, TypeError, RuntimeError, SafetensorError, OSError, ValueError) as e:
        raise RecacheError(f"Flux digits model in {folder} cannot be loaded ({str(e).splitlines()[0]})") from None
    return transformer.eval(), embeddings.eval(), meta


@dataclass
class FluxDigitsPipeline:
    """``pipe`` (a diffusers ``FluxPipeline``), its ``class_embeddings``, true-CFG ``guidance`` and default ``steps``;
    ``pipe(classes, seeds)`` samples (B, 1, 20, 20) digits in about [-1, 1]."""

    pipe: object
    class_embeddings: ClassEmbeddings
    guidance: float
    steps: int
    model_id: str = MODEL_ID

    @classmethod
    def from_pretrained(cls, name_or_folder: str | os.PathLike = MODEL_ID, steps: int | None = None,
                        guidance: float | None = None) -> FluxDigitsPipeline:
        """Load a model; ``steps`` and ``guidance`` default to ``recache.json``'s ``sampling`` values."""
        transformer, embeddings, meta = load_flux_digits(name_or_folder)
        defaults = meta.get("sampling", {})
        return cls(make_flux_pipeline(transformer), embeddings,
                   float(guidance if guidance is not None else defaults.get("guidance", 1.0)),
                   int(steps if steps is not None else defaults.get("steps", 28)), os.fspath(name_or_folder))

    @property
    def transformer(self):
        return self.pipe.transformer

    def check_pairs(self, classes: list[int] | torch.Tensor, seeds: list[int] | torch.Tensor) -> torch.Tensor:
        return check_pairs(classes, seeds, self.class_embeddings.num_classes)

    @torch.no_grad()
    def call_kwargs(self, classes: list[int] | torch.Tensor) -> dict:
        """FluxPipeline keyword arguments for ``classes``: their embeds, the null class's as the negative prompt,
        ``true_cfg_scale = guidance`` (true CFG runs only when it is > 1: ``v_u + g (v_c - v_u)``) and
        ``height = width = 160`` (FluxPipeline's own default, 1024, does not fit the 100-token latents)."""
        classes = torch.as_tensor(classes, dtype=torch.long)
        prompt, pooled = self.class_embeddings(classes)
        neg, neg_pooled = self.class_embeddings(torch.full_like(classes, self.class_embeddings.null_class))
        return {"prompt_embeds": prompt, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": neg,
                "negative_pooled_prompt_embeds": neg_pooled, "true_cfg_scale": self.guidance, "height": PIXEL_SIZE,
                "width": PIXEL_SIZE}

    def noise(self, seeds: list[int] | torch.Tensor) -> torch.Tensor:
        """Packed latents (B, 100, 4): one standard-normal (1, 20, 20) image per seed, each from its own generator."""
        return pack(torch.stack([torch.randn(1, LATENT_SIZE, LATENT_SIZE,
                                             generator=torch.Generator().manual_seed(int(s)))
                                 for s in seeds]))

    @torch.no_grad()
    def __call__(self, classes: list[int] | torch.Tensor, seeds: list[int] | torch.Tensor,
                 num_inference_steps: int | None = None, **pipe_kwargs) -> torch.Tensor:
        """Samples (B, 1, 20, 20) for ``classes[i]`` from the noise of ``seeds[i]``: ``FluxPipeline(...,
        output_type="latent")`` unpacked; further keyword arguments go to the FluxPipeline call."""
        classes = self.check_pairs(classes, seeds)
        out = self.pipe(**self.call_kwargs(classes), latents=self.noise(seeds),
                        num_inference_steps=num_inference_steps or self.steps,
                        output_type="latent", return_dict=False, **pipe_kwargs)[0]
        return unpack(out)
