"""Which diffusers transformers the hooks support, their block stacks, and a fingerprint that names the model."""

from __future__ import annotations

import hashlib
import json

import torch

from recache.errors import RecacheError

# Class name -> the block lists that form its stack, in the order its forward runs them.
SUPPORTED_TRANSFORMERS: dict[str, tuple[str, ...]] = {
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "WanTransformer3DModel": ("blocks",),
    "SD3Transformer2DModel": ("transformer_blocks",),
}


def transformer_of(pipe_or_transformer) -> torch.nn.Module:
    """The denoiser of a pipeline (``pipe.transformer``), or the module itself."""
    transformer = getattr(pipe_or_transformer, "transformer", None)
    return transformer if isinstance(transformer, torch.nn.Module) else pipe_or_transformer


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of a supported transformer in the order they run; a clear error for anything else."""
    name = type(transformer).__name__
    if name not in SUPPORTED_TRANSFORMERS:
        raise RecacheError(f"transformer {name} is not supported; supported: {', '.join(SUPPORTED_TRANSFORMERS)}")
    blocks = [block for attr in SUPPORTED_TRANSFORMERS[name] for block in getattr(transformer, attr, [])]
    if not blocks:
        raise RecacheError(f"transformer {name} has no blocks in {', '.join(SUPPORTED_TRANSFORMERS[name])}")
    return blocks


def model_fingerprint(transformer: torch.nn.Module) -> str:
    """``<class>:<hash of its architecture config>``: what a schedule or policy trained on this model records, so
    one made for another architecture is refused. Weights are not hashed (two fine-tunes share a fingerprint)."""
    config = {k: v for k, v in dict(getattr(transformer, "config", {})).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{type(transformer).__name__}:{digest}"
