"""Tiny, offline-buildable instances of the diffusers transformers whose blocks are in ``TransformerBlockRegistry``.

Every entry of ``ZOO`` (keyed by the transformer class name) builds a random-weight model from a config (a few
blocks, hidden sizes 16-64, a handful of tokens; built in milliseconds, a forward in a few milliseconds) and knows
the keyword arguments its ``forward`` needs, so tests can drive each class directly with ``tiny_euler``, a plain
flow-matching Euler loop. Inputs are drawn from a ``torch.Generator`` seeded by the caller, so a build and a loop
with the same seeds are bit-for-bit reproducible. Everything is float32 on the CPU.

Most classes take the latent as ``hidden_states`` and a ``timestep`` of shape (batch,); the exceptions say so in
``latent_key`` / ``timestep_key`` (Z-Image: ``x`` and ``t``; Cosmos 3: ``vision_tokens`` and ``vision_timesteps``),
and their builders' docstrings describe them. Some classes have no ``cache_context`` (SD3, Z-Image, PixArt, DiT,
Transformer2DModel, PriorTransformer); ``tiny_euler`` then calls them without one.

Left out on purpose: ChronoEditTransformer3DModel and WanAnimateTransformer3DModel define their own copies of
``WanTransformerBlock`` (same name, a different class, so not registered); TransformerTemporalModel is a UNet
sub-module, not a denoiser.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TinyTransformer:
    """How to build one tiny transformer class and call it.

    ``build(seed)`` returns the model in eval mode, its weights drawn after ``torch.manual_seed(seed)``.
    ``inputs(model, batch, seed)`` returns the forward's keyword arguments, the latent included (under
    ``latent_key``) and the timestep excluded. ``timestep(sigma)`` maps flow-matching sigmas of shape ``(batch,)``
    in [0, 1] to the timestep argument (named ``timestep_key``) the class expects.
    """

    build: Callable[[int], torch.nn.Module]
    inputs: Callable[[torch.nn.Module, int, int], dict]
    timestep: Callable[[torch.Tensor], torch.Tensor]
    latent_key: str = "hidden_states"
    timestep_key: str = "timestep"


def _make(cls_name: str, seed: int, **config) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, cls_name)(**config).eval()


def _sigma(sigma: torch.Tensor) -> torch.Tensor:
    return sigma


def _times_1000(sigma: torch.Tensor) -> torch.Tensor:
    return sigma * 1000


def _padding_mask(batch: int, length: int, dtype=torch.float32) -> torch.Tensor:
    """A text mask whose odd samples have their last two tokens padded out, as a tokenizer would pad them."""
    mask = torch.ones(batch, length, dtype=dtype)
    mask[1::2, -2:] = 0
    return mask


# --- Flux ---------------------------------------------------------------------------------------------------------


def _flux(seed: int) -> torch.nn.Module:
    """FluxTransformer2DModel as FLUX.1-dev (and Kontext) ship it: guidance-distilled, so ``guidance`` is passed.
    2 double-stream + 2 single-stream blocks; packed latents of 4x4 tokens."""
    return _make("FluxTransformer2DModel", seed, patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                 guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def _flux_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(4, 4, 3)
    img_ids[..., 1] = torch.arange(4)[:, None]
    img_ids[..., 2] = torch.arange(4)[None, :]
    return {"hidden_states": torch.randn(batch, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
            "pooled_projections": torch.randn(batch, 32, generator=g),
            "img_ids": img_ids.reshape(16, 3), "txt_ids": torch.zeros(8, 3),
            "guidance": torch.full((batch,), 3.5)}


# --- Stable Diffusion 3 -------------------------------------------------------------------------------------------


def _sd3(seed: int) -> torch.nn.Module:
    """SD3Transformer2DModel (MMDiT, SD3-medium style); 3 joint blocks, the last one context-pre-only (it returns
    ``None`` as its encoder stream); an 8x8 latent, patch 2."""
    return _make("SD3Transformer2DModel", seed, sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8)


def _sd3_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g)}


# --- Wan ----------------------------------------------------------------------------------------------------------


def _wan(seed: int) -> torch.nn.Module:
    """WanTransformer3DModel (Wan 2.1 text-to-video; Wan 2.2 uses the same class); 3 blocks; 2 latent frames of
    8x8, patch (1, 2, 2)."""
    return _make("WanTransformer3DModel", seed, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                 in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3,
                 rope_max_seq_len=32)


def _wan_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 2, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g)}


# --- HunyuanVideo -------------------------------------------------------------------------------------------------


def _hunyuan_video(seed: int) -> torch.nn.Module:
    """HunyuanVideoTransformer3DModel (text-to-video, guidance-distilled); 2 double + 1 single stream blocks and one
    token-refiner block; 2 latent frames of 8x8, patch 2."""
    return _make("HunyuanVideoTransformer3DModel", seed, in_channels=4, out_channels=4, num_attention_heads=2,
                 attention_head_dim=16, num_layers=2, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                 patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))


def _hunyuan_video_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 2, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "encoder_attention_mask": _padding_mask(batch, 8),
            "pooled_projections": torch.randn(batch, 16, generator=g),
            "guidance": torch.full((batch,), 6000.0)}  # the pipeline passes guidance_scale * 1000


# --- CogVideoX ----------------------------------------------------------------------------------------------------


def _cogvideox(seed: int) -> torch.nn.Module:
    """CogVideoXTransformer3DModel (CogVideoX-2b style: sin-cos position embeddings, no RoPE); 2 blocks. The latent
    is (batch, frames, channels, height, width) and must match ``sample_height/width/frames`` and the text length
    ``max_text_seq_length`` (8 tokens): 2 latent frames (5 pixel frames) of 8x8, patch 2."""
    return _make("CogVideoXTransformer3DModel", seed, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                 out_channels=4, time_embed_dim=32, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8,
                 sample_frames=5, patch_size=2, max_text_seq_length=8)


def _cogvideox_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 2, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g)}


# --- LTX-Video ----------------------------------------------------------------------------------------------------


def _ltx(seed: int) -> torch.nn.Module:
    """LTXVideoTransformer3DModel; 2 blocks; a packed latent of 2 frames x 4x4 tokens (patch 1), with the
    ``num_frames/height/width`` and RoPE interpolation scale the LTX pipeline passes."""
    return _make("LTXVideoTransformer3DModel", seed, in_channels=8, out_channels=8, num_attention_heads=2,
                 attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=16)


def _ltx_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 2 * 4 * 4, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "encoder_attention_mask": _padding_mask(batch, 8),
            "num_frames": 2, "height": 4, "width": 4,
            "rope_interpolation_scale": (8 / 25, 32, 32)}  # (temporal ratio / frame rate, spatial, spatial)


# --- Qwen-Image ---------------------------------------------------------------------------------------------------


def _qwen_image(seed: int) -> torch.nn.Module:
    """QwenImageTransformer2DModel; 2 dual-stream blocks; packed 2x2 patches of a 4-channel 8x8 latent (16 tokens of
    16 features, so the output matches the latent); takes ``img_shapes`` and ``encoder_hidden_states_mask``."""
    return _make("QwenImageTransformer2DModel", seed, patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))


def _qwen_image_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "encoder_hidden_states_mask": _padding_mask(batch, 8),
            "img_shapes": [[(1, 4, 4)]] * batch}


# --- Flux.2 -------------------------------------------------------------------------------------------------------


def _flux2(seed: int) -> torch.nn.Module:
    """Flux2Transformer2DModel (FLUX.2-dev style, guidance-distilled); 2 double + 1 single stream blocks. Between the
    lists the model concatenates [text, image] into one stream and the single blocks return only that stream."""
    return _make("Flux2Transformer2DModel", seed, patch_size=1, in_channels=16, num_layers=2, num_single_layers=1,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16,
                 mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)


def _flux2_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    a = torch.arange
    return {"hidden_states": torch.randn(batch, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
            "img_ids": torch.cartesian_prod(a(1), a(4), a(4), a(1)),  # (t, h, w, l) as Flux2Pipeline builds them
            "txt_ids": torch.cartesian_prod(a(1), a(1), a(1), a(8)),
            "guidance": torch.full((batch,), 4.0)}


# --- Mochi --------------------------------------------------------------------------------------------------------


def _mochi(seed: int) -> torch.nn.Module:
    """MochiTransformer3DModel; 2 blocks, the last one context-pre-only (it passes its encoder stream through
    untouched); 2 latent frames of 8x8, patch 2. Mochi runs on inverted sigmas: its timestep is ``1000 * (1 - sigma)``
    (the pipeline's scheduler has ``invert_sigmas=True``)."""
    return _make("MochiTransformer3DModel", seed, patch_size=2, num_attention_heads=2, attention_head_dim=16,
                 num_layers=2, pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=16,
                 max_sequence_length=8)


def _mochi_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 2, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "encoder_attention_mask": _padding_mask(batch, 8, torch.bool)}


def _inverted_times_1000(sigma: torch.Tensor) -> torch.Tensor:
    return (1 - sigma) * 1000


# --- Z-Image ------------------------------------------------------------------------------------------------------


def _z_image(seed: int) -> torch.nn.Module:
    """ZImageTransformer2DModel (S3-DiT, single stream); 1 noise-refiner + 1 context-refiner + 2 main blocks, all
    ``ZImageTransformerBlock``. Its forward differs from the others: the latent ``x`` is a *list* of per-sample
    (channels, 1, height, width) tensors, the captions ``cap_feats`` a list of (length, dim) tensors, the timestep is
    called ``t`` and is ``1 - sigma``, and the output is a list (of ``-v``: the pipeline negates it, ``tiny_euler``
    does not, the weights being random). An 8x8 latent, patch 2 (16 tokens, padded to 32 inside the model); the
    captions alternate between 8 and 6 tokens (unpadded, as the pipeline passes them)."""
    return _make("ZImageTransformer2DModel", seed, in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
                 n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[128, 16, 16])


def _z_image_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": list(torch.randn(batch, 4, 1, 8, 8, generator=g).unbind(0)),
            "cap_feats": [torch.randn(8 - 2 * (i % 2), 16, generator=g) for i in range(batch)]}


def _one_minus_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return 1 - sigma


# --- CogView4 -----------------------------------------------------------------------------------------------------


def _cogview4(seed: int) -> torch.nn.Module:
    """CogView4Transformer2DModel; 2 dual-stream blocks; an 8x8 latent, patch 2, with the SDXL-like size conditions
    (``original_size``, ``target_size``, ``crop_coords``) of a 64x64 image."""
    return _make("CogView4Transformer2DModel", seed, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                 attention_head_dim=16, num_attention_heads=2, text_embed_dim=16, time_embed_dim=16, condition_dim=8)


def _cogview4_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "original_size": torch.tensor([[64.0, 64.0]]).repeat(batch, 1),
            "target_size": torch.tensor([[64.0, 64.0]]).repeat(batch, 1),
            "crop_coords": torch.zeros(batch, 2)}


# --- HunyuanImage 2.1 ---------------------------------------------------------------------------------------------


def _hunyuan_image(seed: int) -> torch.nn.Module:
    """HunyuanImageTransformer2DModel (HunyuanImage 2.1 base); 2 double + 1 single stream blocks and one
    token-refiner block; a 4x4 latent, patch (1, 1). The optional ByT5 glyph-text stream is left out: its projection
    has a hard-coded 2048-wide hidden layer (4M parameters) and only changes the text fed to the first block."""
    return _make("HunyuanImageTransformer2DModel", seed, in_channels=4, out_channels=4, num_attention_heads=2,
                 attention_head_dim=16, num_layers=2, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                 patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(8, 8))


def _hunyuan_image_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 4, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "encoder_attention_mask": _padding_mask(batch, 8)}


# --- PixArt -------------------------------------------------------------------------------------------------------


def _pixart(seed: int) -> torch.nn.Module:
    """PixArtTransformer2DModel (PixArt-Sigma style); 2 ``BasicTransformerBlock``s with ada_norm_single; an 8x8
    latent, patch 2. The checkpoints predict a learned variance too (``out_channels=8``, sliced off by the
    pipeline); here ``out_channels=4`` so the output is the velocity-shaped latent."""
    return _make("PixArtTransformer2DModel", seed, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                 out_channels=4, num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
                 caption_channels=16, use_additional_conditions=False)


def _pixart_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "encoder_attention_mask": _padding_mask(batch, 8),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


# --- Bria ---------------------------------------------------------------------------------------------------------


def _bria(seed: int) -> torch.nn.Module:
    """BriaTransformer2DModel (Flux-like, no pooled projection, no guidance); 2 double-stream blocks (registered) +
    1 single-stream block (``BriaSingleTransformerBlock``, not registered); packed latents of 4x4 tokens."""
    return _make("BriaTransformer2DModel", seed, patch_size=1, in_channels=16, num_layers=2, num_single_layers=1,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6])


def _bria_inputs(model, batch: int, seed: int) -> dict:
    inputs = _flux_inputs(model, batch, seed)
    del inputs["pooled_projections"], inputs["guidance"]
    return inputs


# --- Kandinsky 5 --------------------------------------------------------------------------------------------------


def _kandinsky5(seed: int) -> torch.nn.Module:
    """Kandinsky5Transformer3DModel (text-to-video, ``visual_cond=False`` so the input and output channels match);
    1 text-encoder block (``Kandinsky5TransformerEncoderBlock``, not registered) + 2 visual decoder blocks. The latent
    is channels-last, (batch, frames, height, width, channels): 2 frames of 8x8, patch (1, 2, 2). Its forward
    returns a bare tensor, not a tuple, when ``return_dict=False``. Its modulation layers are zero-initialized,
    which makes every block the identity and the output independent of the timestep; they are re-drawn here."""
    model = _make("Kandinsky5Transformer3DModel", seed, in_visual_dim=4, in_text_dim=16, in_text_dim2=16, time_dim=16,
                  out_visual_dim=4, patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1,
                  num_visual_blocks=2, axes_dims=(4, 6, 6))
    for module in model.modules():
        if type(module).__name__ == "Kandinsky5Modulation":
            module.out_layer.reset_parameters()  # continues the seeded global RNG, so still deterministic
    return model


def _kandinsky5_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 2, 8, 8, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g),
            "visual_rope_pos": [torch.arange(2), torch.arange(4), torch.arange(4)],  # the post-patch grid
            "text_rope_pos": torch.arange(8),
            "scale_factor": (1, 2, 2)}


# --- Motif-Video --------------------------------------------------------------------------------------------------


def _motif_video(seed: int) -> torch.nn.Module:
    """MotifVideoTransformer3DModel; 2 double + 2 single stream blocks, the last single block a *decoder* layer
    (``num_decoder_layers=1``): it runs on a copy of the embedded latent taken before the first block, with the
    encoder stack's output as its ``encoder_hidden_states``. The pipeline feeds ``[latent | condition | mask]``
    (``in_channels=33``); here ``in_channels=out_channels=4`` so the input is the latent itself. 2 frames of 8x8."""
    return _make("MotifVideoTransformer3DModel", seed, in_channels=4, out_channels=4, num_attention_heads=2,
                 attention_head_dim=16, num_layers=2, num_single_layers=2, num_decoder_layers=1, mlp_ratio=2.0,
                 patch_size=2, text_embed_dim=16, rope_axes_dim=(4, 6, 6))


def _motif_video_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 2, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "encoder_attention_mask": _padding_mask(batch, 8)}


# --- Cosmos 3 -----------------------------------------------------------------------------------------------------

_COSMOS3_VISION_TOKENS = 2 * 4 * 4  # latent frames x patch rows x patch columns of the tiny latent


def _cosmos3(seed: int) -> torch.nn.Module:
    """Cosmos3OmniTransformer (a Qwen3-style mixture-of-transformers: every ``Cosmos3VLTextMoTDecoderLayer`` runs a
    causal text ("understanding") stream and a generation stream side by side); 2 layers, GQA (2 query heads, 1 KV
    head). Its forward is unlike the others: one *unbatched packed* sequence per call (the pipeline generates one
    video per call), so ``batch`` is ignored; the latent ``vision_tokens`` is a one-item list holding a
    (1, channels, frames, height, width) tensor (2 frames of 8x8, patch 2); the timestep ``vision_timesteps`` is per
    noisy token (``sigma * 1000``); the output is a tuple of per-modality lists."""
    return _make("Cosmos3OmniTransformer", seed, head_dim=16, hidden_size=32, intermediate_size=64, latent_channel=4,
                 latent_patch_size=2, num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=1,
                 patch_latent_dim=16, vocab_size=64, rope_axes_dim=(4, 2, 2))


def _cosmos3_inputs(model, batch: int, seed: int) -> dict:
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import (
        get_3d_mrope_ids_text_tokens,
        get_3d_mrope_ids_vae_tokens,
    )

    g = torch.Generator().manual_seed(seed)
    config, und_len, vision = model.config, 8, torch.arange(8, 8 + _COSMOS3_VISION_TOKENS)
    text_ids, offset = get_3d_mrope_ids_text_tokens(und_len, 0, use_float_positions=config.enable_fps_modulation)
    vision_ids, _ = get_3d_mrope_ids_vae_tokens(2, 4, 4, offset + config.unified_3d_mrope_temporal_modality_margin,
                                                 fps=24.0, base_fps=float(config.base_fps))
    return {"vision_tokens": [torch.randn(1, 4, 2, 8, 8, generator=g)],
            "input_ids": torch.randint(0, config.vocab_size, (und_len,), generator=g),
            "text_indexes": torch.arange(und_len), "position_ids": torch.cat([text_ids, vision_ids], dim=1),
            "und_len": und_len, "sequence_length": und_len + _COSMOS3_VISION_TOKENS,
            "vision_token_shapes": [(2, 4, 4)], "vision_sequence_indexes": vision,
            "vision_mse_loss_indexes": vision, "vision_noisy_frame_indexes": [torch.arange(2)]}


def _cosmos3_timestep(sigma: torch.Tensor) -> torch.Tensor:
    return (sigma[:1] * 1000).repeat(_COSMOS3_VISION_TOKENS)


# --- HunyuanVideo FramePack ---------------------------------------------------------------------------------------


def _framepack(seed: int) -> torch.nn.Module:
    """HunyuanVideoFramepackTransformer3DModel (the same double/single blocks as HunyuanVideo, plus a SigLIP image
    projection and the clean / 2x / 4x history embedders FramePack needs); 2 double + 1 single stream blocks. The
    history tokens are prepended to the latent's before the first block and cut off after the last one."""
    return _make("HunyuanVideoFramepackTransformer3DModel", seed, in_channels=4, out_channels=4, num_attention_heads=2,
                 attention_head_dim=16, num_layers=2, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                 text_embed_dim=16, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6), has_image_proj=True,
                 image_proj_dim=16, has_clean_x_embedder=True)


def _framepack_inputs(model, batch: int, seed: int) -> dict:
    """HunyuanVideo's inputs, an image embedding, and the clean and history latents with their frame indices
    (shared by the batch, as the pipeline has them)."""
    g = torch.Generator().manual_seed(seed + 1)
    return {**_hunyuan_video_inputs(model, batch, seed),
            "image_embeds": torch.randn(batch, 4, 16, generator=g),
            "guidance": torch.full((batch,), 10000.0),  # guidance_scale * 1000
            "indices_latents": torch.tensor([1, 2]),
            "latents_clean": torch.randn(batch, 4, 2, 8, 8, generator=g), "indices_latents_clean": torch.tensor([0, 3]),
            "latents_history_2x": torch.randn(batch, 4, 2, 8, 8, generator=g),
            "indices_latents_history_2x": torch.tensor([4, 5]),
            "latents_history_4x": torch.randn(batch, 4, 4, 8, 8, generator=g),
            "indices_latents_history_4x": torch.tensor([6, 7, 8, 9])}


# --- Wan VACE -----------------------------------------------------------------------------------------------------


def _wan_vace(seed: int) -> torch.nn.Module:
    """WanVACETransformer3DModel; 3 ``WanTransformerBlock``s plus 2 ``WanVACETransformerBlock``s (not registered) at
    ``vace_layers=[0, 2]``: the VACE blocks all run first, then each of their hints is *added* to the main stream
    right after main blocks 0 and 2. ``control_hidden_states`` has ``vace_in_channels=8`` channels."""
    return _make("WanVACETransformer3DModel", seed, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                 in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3,
                 rope_max_seq_len=32, vace_layers=[0, 2], vace_in_channels=8)


def _wan_vace_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 2, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "control_hidden_states": torch.randn(batch, 8, 2, 8, 8, generator=g)}


# --- BasicTransformerBlock models ---------------------------------------------------------------------------------


def _latte(seed: int) -> torch.nn.Module:
    """LatteTransformer3DModel; 2 spatial + 2 temporal ``BasicTransformerBlock``s run *interleaved* (spatial 0,
    temporal 0, spatial 1, ...), the stream reshaped between (frames x tokens) and (tokens x frames) batches. 2 frames
    of 8x8, patch 2; ``out_channels=4`` (the checkpoints have 8, learned variance)."""
    return _make("LatteTransformer3DModel", seed, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                 out_channels=4, num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
                 num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                 caption_channels=16, video_length=2)


def _latte_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 2, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g)}


def _dit(seed: int) -> torch.nn.Module:
    """DiTTransformer2DModel (class-conditional, ada_norm_zero); 2 ``BasicTransformerBlock``s; an 8x8 latent, patch
    2, 10 classes; ``out_channels=4`` (the checkpoints have 8, learned variance)."""
    return _make("DiTTransformer2DModel", seed, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                 out_channels=4, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def _dit_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "class_labels": torch.randint(0, 10, (batch,), generator=g)}


def _transformer_2d(seed: int) -> torch.nn.Module:
    """Transformer2DModel in its patched, PixArt-alpha-style configuration (``norm_type="ada_norm_single"``), the
    legacy form of PixArt checkpoints; 2 ``BasicTransformerBlock``s; an 8x8 latent, patch 2."""
    return _make("Transformer2DModel", seed, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                 out_channels=4, num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
                 activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                 norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=16, use_additional_conditions=False)


def _prior(seed: int) -> torch.nn.Module:
    """PriorTransformer (the unCLIP / Kandinsky 2.x prior, denoising a CLIP image embedding); 2
    ``BasicTransformerBlock``s. The latent is one 16-d embedding per sample, shape (batch, 16); the text tokens,
    the text embedding and the learned query are concatenated into the token sequence before the first block."""
    return _make("PriorTransformer", seed, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                 embedding_dim=16, num_embeddings=8, additional_embeddings=4)


def _prior_inputs(model, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 16, generator=g),
            "proj_embedding": torch.randn(batch, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "attention_mask": _padding_mask(batch, 8, torch.bool)}


ZOO: dict[str, TinyTransformer] = {
    "FluxTransformer2DModel": TinyTransformer(_flux, _flux_inputs, _sigma),
    "SD3Transformer2DModel": TinyTransformer(_sd3, _sd3_inputs, _times_1000),
    "WanTransformer3DModel": TinyTransformer(_wan, _wan_inputs, _times_1000),
    "HunyuanVideoTransformer3DModel": TinyTransformer(_hunyuan_video, _hunyuan_video_inputs, _times_1000),
    "CogVideoXTransformer3DModel": TinyTransformer(_cogvideox, _cogvideox_inputs, _times_1000),
    "LTXVideoTransformer3DModel": TinyTransformer(_ltx, _ltx_inputs, _times_1000),
    "QwenImageTransformer2DModel": TinyTransformer(_qwen_image, _qwen_image_inputs, _sigma),
    "Flux2Transformer2DModel": TinyTransformer(_flux2, _flux2_inputs, _sigma),
    "MochiTransformer3DModel": TinyTransformer(_mochi, _mochi_inputs, _inverted_times_1000),
    "ZImageTransformer2DModel": TinyTransformer(_z_image, _z_image_inputs, _one_minus_sigma, "x", "t"),
    "CogView4Transformer2DModel": TinyTransformer(_cogview4, _cogview4_inputs, _times_1000),
    "HunyuanImageTransformer2DModel": TinyTransformer(_hunyuan_image, _hunyuan_image_inputs, _times_1000),
    "PixArtTransformer2DModel": TinyTransformer(_pixart, _pixart_inputs, _times_1000),
    "BriaTransformer2DModel": TinyTransformer(_bria, _bria_inputs, _times_1000),
    "Kandinsky5Transformer3DModel": TinyTransformer(_kandinsky5, _kandinsky5_inputs, _times_1000),
    "MotifVideoTransformer3DModel": TinyTransformer(_motif_video, _motif_video_inputs, _times_1000),
    "Cosmos3OmniTransformer": TinyTransformer(_cosmos3, _cosmos3_inputs, _cosmos3_timestep, "vision_tokens",
                                              "vision_timesteps"),
    "HunyuanVideoFramepackTransformer3DModel": TinyTransformer(_framepack, _framepack_inputs, _times_1000),
    "WanVACETransformer3DModel": TinyTransformer(_wan_vace, _wan_vace_inputs, _times_1000),
    "LatteTransformer3DModel": TinyTransformer(_latte, _latte_inputs, _times_1000),
    "DiTTransformer2DModel": TinyTransformer(_dit, _dit_inputs, _times_1000),
    "Transformer2DModel": TinyTransformer(_transformer_2d, _pixart_inputs, _times_1000),
    "PriorTransformer": TinyTransformer(_prior, _prior_inputs, _times_1000),
}


def tiny_euler(transformer, name: str, steps: int, batch: int = 2, seed: int = 0, context: str | None = "cond"):
    """Plain flow-matching Euler over ``torch.linspace(1, 0, steps + 1)``: ``x <- x + (s[i+1] - s[i]) * v`` with
    ``v = transformer(**inputs, <timestep_key>=ZOO[name].timestep(s[i].expand(batch)), return_dict=False)[0]`` and
    the latent ``x`` under ``ZOO[name].latent_key``. Each call runs inside
    ``transformer.cache_context(context, step_index=i, num_inference_steps=steps)`` when the model has
    ``cache_context`` and ``context`` is not None. Returns the final ``x``.

    Two classes need care: a forward that takes its latent as a list of per-sample tensors (Z-Image, Cosmos 3) gets
    ``list(x.unbind(0))`` and returns a list, so ``x`` is the stacked list and the result is a tensor of shape
    ``torch.stack(inputs[latent_key])``; Kandinsky 5 returns a bare tensor for ``return_dict=False``, which is ``v``
    itself (indexing it would take the first sample)."""
    entry = ZOO[name]
    inputs = entry.inputs(transformer, batch, seed)
    latent = inputs[entry.latent_key]
    as_list = isinstance(latent, (list, tuple))
    x = torch.stack(list(latent)) if as_list else latent
    sigmas = torch.linspace(1, 0, steps + 1)
    for i in range(steps):
        with_context = context is not None and hasattr(transformer, "cache_context")
        scope = (transformer.cache_context(context, step_index=i, num_inference_steps=steps) if with_context
                 else nullcontext())
        call = {**inputs, entry.latent_key: list(x.unbind(0)) if as_list else x,
                entry.timestep_key: entry.timestep(sigmas[i].expand(batch))}
        with scope, torch.no_grad():
            out = transformer(**call, return_dict=False)
        v = out if isinstance(out, torch.Tensor) else out[0]
        v = torch.stack(list(v)) if as_list else v
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x
