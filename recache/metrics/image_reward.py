"""Reference-free quality ``Q(x, prompt)`` for pipelines: ImageReward (Xu et al. 2023, arXiv 2304.05977), the
optional extra ``recache[image-reward]``. Its weights come from the Hugging Face hub; where they cannot be had the
loader says so in one line and the embedded metrics carry the claims."""

from __future__ import annotations

from collections.abc import Callable

import torch

from recache.errors import RecacheError


def load_image_reward(name: str = "ImageReward-v1.0") -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """``score(images, prompts)``: one ImageReward score per image (images (B, 3, H, W) in [0, 1])."""
    try:
        import ImageReward as image_reward  # the optional extra: pip install 'recache[image-reward]'

        model = image_reward.load(name, device="cpu").eval()
    except Exception as e:  # missing package, or weights that cannot be downloaded here
        raise RecacheError("ImageReward is not available "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           "install the 'image-reward' extra with its weights, or train with --alpha 0") from None

    @torch.no_grad()
    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from PIL import Image

        pil = [Image.fromarray((img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()) for img in images]
        return torch.tensor([float(model.score(p, [im])) for p, im in zip(prompts, pil, strict=True)])

    return score
