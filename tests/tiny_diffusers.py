"""Tiny diffusers pipelines and transformers built from configs, offline (random weights, seconds to build)."""

from __future__ import annotations

import string

import torch


def _tokenizers():
    from transformers import CLIPTokenizer, T5TokenizerFast

    chars = string.ascii_lowercase + string.digits + ".,!?'-"  # character-level BPE, no merges
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += ([("\u2581" + w, -1.0) for w in "a photo of cat dog the".split()]
               + [(c, -5.0) for c in string.ascii_lowercase])
    return clip, T5TokenizerFast(vocab=pieces, extra_ids=0)


def tiny_flux_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def tiny_flux_pipeline(seed: int = 0, img2img: bool = False):
    """A whole FluxPipeline (CLIP + T5 + VAE + scheduler); 64x64, 10 steps in about 0.05 s. ``img2img`` builds the
    FluxImg2ImgPipeline on the same parts."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok, tok2 = _tokenizers()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1, projection_dim=32)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8)).eval()
    vae = _tiny_vae()
    cls = FluxImg2ImgPipeline if img2img else FluxPipeline
    return cls(scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
               tokenizer_2=tok2, vae=vae, transformer=tiny_flux_transformer(seed))


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                         scaling_factor=1.5035).eval()


def tiny_sd3_pipeline(seed: int = 0, img2img: bool = False):
    """A whole StableDiffusion3Pipeline (two CLIPs with projection, T5, VAE, scheduler) on the tiny SD3 transformer;
    32x32 images (16x16 latents). ``img2img`` builds the StableDiffusion3Img2ImgPipeline on the same parts."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok, tok3 = _tokenizers()
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=8)).eval()
        for _ in range(2)]
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=16, d_ff=16, d_kv=8, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8)).eval()
    cls = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
    return cls(transformer=tiny_sd3_transformer(seed), scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(),
               text_encoder=clips[0], tokenizer=tok, text_encoder_2=clips[1], tokenizer_2=tok,
               text_encoder_3=t5, tokenizer_3=tok3)


def tiny_wan_transformer(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3,
                                 rope_max_seq_len=32).eval()


def tiny_wan_pipeline(seed: int = 0):
    """A whole WanPipeline (UMT5, a Wan VAE, UniPC with flow sigmas as Wan ships it) on the tiny Wan transformer;
    one frame of 32x32 (4x4 latents). The pipeline passes ``step_index`` and ``num_inference_steps`` in its cache
    contexts and runs CFG as a "cond" and an "uncond" call."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    _, tok = _tokenizers()
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=16, d_ff=16, d_kv=8, num_layers=1, num_heads=2,
                                       relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tok, text_encoder=text, vae=vae, scheduler=scheduler,
                       transformer=tiny_wan_transformer(seed))


def tiny_wan22_pipeline(seed: int = 0, boundary_ratio: float = 0.9):
    """A Wan 2.2-style WanPipeline: the tiny Wan pipeline with a second expert (``transformer_2``, other weights) that
    runs the steps whose timestep is below ``boundary_ratio`` x 1000."""
    from diffusers import WanPipeline

    parts = {k: v for k, v in tiny_wan_pipeline(seed).components.items() if k != "transformer_2"}
    return WanPipeline(**parts, transformer_2=tiny_wan_transformer(seed + 1), boundary_ratio=boundary_ratio)


def tiny_sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                 num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                 pooled_projection_dim=16, out_channels=4).eval()


def transformer_inputs(transformer, batch: int = 2, seed: int = 0) -> dict:
    """Keyword arguments for one call of a tiny transformer (a latent, a text condition, a timestep)."""
    g = torch.Generator().manual_seed(seed)
    name = type(transformer).__name__
    if name == "FluxTransformer2DModel":
        from diffusers import FluxPipeline

        img_ids = FluxPipeline._prepare_latent_image_ids(batch, 4, 4, "cpu", torch.float32)
        return {"hidden_states": torch.randn(batch, 16, 16, generator=g),
                "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
                "pooled_projections": torch.randn(batch, 32, generator=g),
                "img_ids": img_ids, "txt_ids": torch.zeros(8, 3)}
    if name == "WanTransformer3DModel":
        return {"hidden_states": torch.randn(batch, 4, 2, 8, 8, generator=g),
                "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g)}
    return {"hidden_states": torch.randn(batch, 4, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g)}


def euler_loop(transformer, steps: int, inputs: dict, context: str | None = "cond") -> torch.Tensor:
    """A plain flow-matching Euler loop over ``steps`` steps driving the transformer directly; each call in a
    Wan-style ``cache_context`` carrying ``num_inference_steps`` when the model has contexts (SD3 has none)."""
    from contextlib import nullcontext

    x = inputs["hidden_states"]
    sigmas = torch.linspace(1, 0, steps + 1)
    for i in range(steps):
        t = sigmas[i].expand(x.shape[0])
        with_context = context and hasattr(transformer, "cache_context")
        scope = (transformer.cache_context(context, step_index=i, num_inference_steps=steps) if with_context
                 else nullcontext())
        with scope, torch.no_grad():
            timestep = t if type(transformer).__name__ == "FluxTransformer2DModel" else t * 1000
            v = transformer(**{**inputs, "hidden_states": x}, timestep=timestep, return_dict=False)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x
