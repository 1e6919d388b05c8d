"""The shipped ``mnist-flux`` model through a real diffusers ``FluxPipeline`` (no training, no downloads)."""

from contextlib import contextmanager

import pytest
import torch

from recache.errors import RecacheError
from recache.metrics.classifier import classifier_scores
from recache.models.flux_digits import WEIGHTS, FluxDigitsPipeline, pack, unpack, velocity
from recache.models.pretrained import load_classifier
from recache.protocol import heldout_pairs

FEW = 4  # sampling steps where only shapes and bits matter


@pytest.fixture(scope="module")
def pipe() -> FluxDigitsPipeline:
    return FluxDigitsPipeline.from_pretrained("mnist-flux")


def test_shipped_folder_is_flat_small_and_diffusers_loadable():
    from diffusers import FluxTransformer2DModel

    names = {p.name for p in WEIGHTS.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "class_embeddings.safetensors", "recache.json",
            "MODEL_CARD.md", "samples.png"} <= names
    # package-data globs
    assert all(p.is_file() and p.suffix in {".safetensors", ".json", ".md", ".png"} for p in WEIGHTS.iterdir())
    assert sum(p.stat().st_size for p in WEIGHTS.iterdir()) < 6e6
    assert isinstance(FluxTransformer2DModel.from_pretrained(WEIGHTS), FluxTransformer2DModel)


def test_pipeline_is_a_real_flux_pipeline_in_eval_mode(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    assert isinstance(pipe.pipe, FluxPipeline) and isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.pipe.vae is None
    assert pipe.pipe.vae_scale_factor == 8 and pipe.model_id == "mnist-flux"
    assert pipe.steps == 50 and pipe.guidance > 1
    assert not any(m.training for m in [*pipe.transformer.modules(), *pipe.class_embeddings.modules()])


def test_shapes_and_call_kwargs(pipe):
    noise = pipe.noise([3, 4])
    assert noise.shape == (2, 100, 4) and torch.equal(unpack(pack(unpack(noise))), unpack(noise))
    assert torch.equal(unpack(noise)[0], torch.randn(1, 20, 20, generator=torch.Generator().manual_seed(3)))
    kwargs = pipe.call_kwargs([1, 2])
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape == (2, 4, 64)
    assert kwargs["pooled_prompt_embeds"].shape == kwargs["negative_pooled_prompt_embeds"].shape == (2, 64)
    assert kwargs["true_cfg_scale"] == pipe.guidance and kwargs["height"] == kwargs["width"] == 160
    assert torch.equal(kwargs["negative_prompt_embeds"][0], kwargs["negative_prompt_embeds"][1])
    images = pipe([1, 2], [3, 4], num_inference_steps=FEW)
    assert images.shape == (2, 1, 20, 20)
    # the diffusers call itself
    latents = pipe.pipe(**kwargs, latents=noise, num_inference_steps=FEW, output_type="latent").images
    assert torch.equal(unpack(latents), images)


def test_bit_identical_and_independent_of_the_batch(pipe):
    a = pipe([0, 5, 9], [11, 12, 13], num_inference_steps=FEW)
    assert torch.equal(a, pipe([0, 5, 9], [11, 12, 13], num_inference_steps=FEW))
    alone = pipe([5], [12], num_inference_steps=FEW)
    # same noise and class; only matmul batch sizes differ
    torch.testing.assert_close(alone[0], a[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[0], a[2])


def test_one_step_is_the_training_velocity(pipe):
    """One Euler step from sigma 1 to 0 without guidance gives ``noise - v(noise, 1)``: sampling calls the
    transformer exactly as training does (packing, ids, ``timestep = sigma``)."""
    one = FluxDigitsPipeline(pipe.pipe, pipe.class_embeddings, guidance=1.0, steps=1)
    noise = one.noise([7])
    with torch.no_grad():
        v = velocity(pipe.transformer, pipe.class_embeddings, noise, torch.ones(1), torch.tensor([4]))
    torch.testing.assert_close(one([4], [7]), unpack(noise - v))


def _contexts(pipe, monkeypatch, **call):
    """The cache-context name active at each transformer call."""
    transformer, active, seen = pipe.transformer, [None], []
    original = transformer.cache_context

    @contextmanager
    def spy(name, **kwargs):
        active.append(name)
        with original(name, **kwargs):
            yield
        active.pop()

    monkeypatch.setattr(transformer, "cache_context", spy)
    handle = transformer.register_forward_pre_hook(lambda module, args: seen.append(active[-1]))
    try:
        pipe([3], [1], num_inference_steps=3, **call)
    finally:
        handle.remove()
    return seen


def test_true_cfg_calls_cond_and_uncond_each_step(pipe, monkeypatch):
    assert _contexts(pipe, monkeypatch) == ["cond", "uncond"] * 3


def test_guidance_one_runs_only_cond(pipe, monkeypatch):
    """FluxPipeline runs true CFG only when ``true_cfg_scale > 1``."""
    unguided = FluxDigitsPipeline(pipe.pipe, pipe.class_embeddings, guidance=1.0, steps=pipe.steps)
    assert _contexts(unguided, monkeypatch) == ["cond"] * 3


def test_samples_are_the_intended_digits(pipe):
    classes, seeds = heldout_pairs(per_class=2)
    x = pipe(classes, seeds)
    assert x.abs().max() < 2
    assert classifier_scores(load_classifier(), x, classes)["class_correct"].mean() >= 0.85


def test_bad_inputs(pipe, tmp_path):
    with pytest.raises(RecacheError, match="class 10 is outside 0-9"):
        pipe([10], [0])
    with pytest.raises(RecacheError, match="one seed per sample"):
        pipe([1, 2], [0])
    with pytest.raises(RecacheError, match="missing"):
        FluxDigitsPipeline.from_pretrained(tmp_path)
