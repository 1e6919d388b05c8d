"""The hooks on pipelines as users build them: Wan 2.2's two experts under one schedule, ``torch.compile``-wrapped
transformers, regional compile refused, a policy checked against the pipeline's sigma grid (``allow_extrapolate``),
a schedule's aligned grid, and a saved pipeline loaded back (tiny, offline)."""

from __future__ import annotations

import pytest
import torch
from test_hook_generations import WAN_CALL, held_tensors
from test_hooks import assert_untouched, block_runs, flux_images
from tiny_diffusers import tiny_flux_pipeline, tiny_wan22_pipeline

import recache
from recache.errors import RecacheError
from recache.hooks import model_fingerprint, transformer_blocks
from recache.policies.noise_level import NoiseLevelConfig, NoiseLevelPolicy
from recache.schedule import Schedule


def wan_latents(pipe, steps=10):
    return pipe(**WAN_CALL, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).frames


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny_flux_pipeline()


def test_wan22_runs_both_experts_under_one_schedule_of_exactly_k():
    pipe = tiny_wan22_pipeline()  # expert 1 runs steps 0-2 of 10 (timesteps >= 900), expert 2 the rest
    reference = wan_latents(pipe)
    runs = [block_runs(pipe.transformer), block_runs(pipe.transformer_2)]
    n_blocks = len(transformer_blocks(pipe.transformer))
    recache.enable(pipe, budget=1.0)
    assert torch.equal(wan_latents(pipe), reference)
    recache.disable(pipe)
    for k, steps, moved in ((4, [0, 3, 6, 9], []), (2, [0, 3], [[9, 3]])):
        recache.enable(pipe, budget=k)
        runs[0][0] = runs[1][0] = 0
        cached = wan_latents(pipe)
        summary, held = recache.summary(pipe), held_tensors(pipe)
        recache.disable(pipe)
        assert held == 0  # the generation's state was dropped after its last step
        assert summary.full_passes == {"cond": k, "uncond": k}  # both experts, counted by their attention calls:
        assert runs[0][0] + runs[1][0] == 2 * k * n_blocks and runs[1][0] > 0
        assert summary.last["cond"]["computed_steps"] == steps and summary.last["cond"]["moved_passes"] == moved
        assert 0 < ((cached - reference).norm() / reference.norm()).item() < 0.5
    assert "the pass of step 9 moved to step 3, where the next expert starts" in str(summary)
    assert torch.equal(wan_latents(pipe), reference)  # disable restores both experts bit for bit


def test_wan22_expert_with_no_pass_left_is_filled_from_the_other_and_k_stays_exact():
    pipe = tiny_wan22_pipeline(boundary_ratio=0.5)  # expert 2 runs steps 8 and 9 (timesteps 429 and 251)
    runs = block_runs(pipe.transformer_2)
    recache.enable(pipe, schedule=Schedule.from_steps(10, [0, 4]))
    try:
        wan_latents(pipe)
        summary = recache.summary(pipe)
    finally:
        recache.disable(pipe)
    assert summary.full_passes == {"cond": 2, "uncond": 2} and runs[0] == 0
    assert summary.last["cond"]["filled_from_other_expert"] == 8 and "filled from the other expert" in str(summary)


def test_wan22_rollouts_count_both_experts_and_a_cache_on_either_is_refused():
    from diffusers import FirstBlockCacheConfig

    from recache.sampling.diffusers_rollouts import DiffusersRollouts

    pipe = tiny_wan22_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = {k: v for k, v in WAN_CALL.items() if k not in ("prompt", "negative_prompt", "output_type")}
    rollouts = DiffusersRollouts(pipe, [{"prompt": "a cat", "negative_prompt": "a dog"}], steps=6, call_kwargs=call)
    runs = [block_runs(pipe.transformer), block_runs(pipe.transformer_2)]
    masks = torch.tensor([[1, 0, 0, 1, 0, 1]], dtype=torch.bool)  # expert 2 runs steps 2-5 (timestep < 900)
    _, passes = rollouts.rollout_rows([0], [3], masks, "taylorseer")
    n_blocks = len(transformer_blocks(pipe.transformer))
    # expert 1 computes step 0; expert 2 step 2 (where it starts: the pass of step 3 moves there) and step 5
    assert passes.tolist() == [3] and runs[0][0] == 2 * n_blocks and runs[1][0] == 2 * 2 * n_blocks
    pipe.transformer_2.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(RecacheError, match="a diffusers cache is enabled on this transformer"):
        recache.enable(pipe, budget=3)
    assert not hasattr(pipe.transformer, "_diffusers_hook") or not pipe.transformer._diffusers_hook.hooks


@pytest.mark.parametrize("mechanism", ["reuse", "taylorseer", "hicache"])
def test_a_torch_compile_wrapped_transformer_is_unwrapped_and_hooked(flux_pipe, mechanism):
    reference = flux_images(flux_pipe, 8)
    recache.enable(flux_pipe, budget=4, mechanism=mechanism)
    eager = flux_images(flux_pipe, 8)
    recache.disable(flux_pipe)
    original = flux_pipe.transformer
    flux_pipe.transformer = torch.compile(original, backend="eager")  # dynamo's tracing, no code generation
    try:
        recache.enable(flux_pipe, budget=8, mechanism=mechanism)
        assert torch.equal(flux_images(flux_pipe, 8), reference)
        recache.disable(flux_pipe)
        recache.enable(flux_pipe, budget=4, mechanism=mechanism)
        compiled = flux_images(flux_pipe, 8)
        assert recache.summary(flux_pipe).full_passes == {"cond": 4}
        recache.disable(flux_pipe)
    finally:
        flux_pipe.transformer = original
    assert torch.allclose(compiled, eager, atol=1e-5) and not torch.equal(compiled, reference)
    assert_untouched(flux_pipe)


def test_regional_compile_is_refused_in_one_line_before_and_after_enable():
    pipe = tiny_flux_pipeline()
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    with pytest.raises(RecacheError, match="compiled one by one .* compile the whole transformer instead"):
        recache.enable(pipe, budget=4)
    assert_untouched(pipe)
    pipe = tiny_flux_pipeline()
    recache.enable(pipe, budget=4)
    runs = block_runs(pipe.transformer)
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    with pytest.raises(RecacheError, match="compiled one by one"):
        flux_images(pipe, 8)
    assert runs[0] == 0  # refused before the transformer ran
    recache.disable(pipe)


def _noise_level_policy(transformer, T=10, shift=1.0) -> NoiseLevelPolicy:
    """An untrained v2 policy that says it was trained on this transformer for T steps on a grid of ``shift``."""
    torch.manual_seed(0)
    config = NoiseLevelConfig(settings=[{"T": T, "shift": shift}], k_fraction=[0.2, 0.5], hidden=16,
                              model=model_fingerprint(transformer))
    return NoiseLevelPolicy(config).eval()


def test_a_policy_is_checked_against_the_pipelines_step_count_and_grid(flux_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    policy = _noise_level_policy(flux_pipe.transformer)
    recache.enable(flux_pipe, budget=4, policy=policy)
    try:
        flux_images(flux_pipe, 10)
        assert recache.summary(flux_pipe).last["cond"]["guard"] == "learned"
        with pytest.raises(RecacheError, match="T=12 is outside the trained range"):
            flux_images(flux_pipe, 12)
        scheduler = flux_pipe.scheduler
        flux_pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        with pytest.raises(RecacheError, match="a grid of shift 3 is outside the trained range"):
            flux_images(flux_pipe, 10)
        flux_pipe.scheduler = scheduler
    finally:
        recache.disable(flux_pipe)
    recache.enable(flux_pipe, budget=4, policy=policy, allow_extrapolate=True)
    try:
        flux_images(flux_pipe, 12)
        last = recache.summary(flux_pipe).last["cond"]
        assert len(last["computed_steps"]) == 4 and last["guard"] == "not checked"
        assert "its guard did not check them" in str(recache.summary(flux_pipe))
    finally:
        recache.disable(flux_pipe)


def test_an_aligned_schedule_runs_only_on_its_grid(flux_pipe):
    aligned = [1.0, 0.95, 0.85, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    schedule = Schedule.from_steps(10, [0, 2, 5, 8], aligned_sigmas=aligned)
    recache.enable(flux_pipe, schedule=schedule)
    try:
        runs = block_runs(flux_pipe.transformer)
        with pytest.raises(RecacheError, match="aligned to its own sigma grid .*sigmas=aligned_sigmas"):
            flux_images(flux_pipe, 10)
        assert runs[0] == 0
        flux_images(flux_pipe, 10, sigmas=aligned[:-1])  # the tiny pipeline's scheduler does not shift them
        assert recache.summary(flux_pipe).last["cond"]["computed_steps"] == [0, 2, 5, 8]
    finally:
        recache.disable(flux_pipe)


def test_a_saved_wan_pipeline_loads_and_caches(tmp_path):
    from diffusers import DiffusionPipeline

    tiny_wan22_pipeline().save_pretrained(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path, use_safetensors=True)  # Wan keeps modules in fp32: accelerate
    pipe.set_progress_bar_config(disable=True)
    recache.enable(pipe, budget=3)
    try:
        wan_latents(pipe)
        assert recache.summary(pipe).full_passes == {"cond": 3, "uncond": 3}
    finally:
        recache.disable(pipe)



@pytest.mark.parametrize("mechanism", ["reuse", "taylorseer", "hicache"])
def test_controlnet_residuals_are_added_once_on_cached_steps(mechanism):
    """Blocks made the identity (their gates zeroed): the output is then the input plus the ControlNet residuals
    the model adds between blocks. A cached step must add that step's residuals once, not again inside the
    forecast of the blocks' residual (which is zero), so cached and uncached agree."""
    from tiny_diffusers import euler_loop, tiny_flux_transformer, transformer_inputs

    from recache.hooks import RecacheHookConfig, apply_recache, remove_recache

    transformer = tiny_flux_transformer()
    with torch.no_grad():
        for block in transformer_blocks(transformer):
            for norm in ("norm1", "norm1_context", "norm"):
                if hasattr(block, norm):
                    getattr(block, norm).linear.weight.zero_()
                    getattr(block, norm).linear.bias.zero_()
    g = torch.Generator().manual_seed(1)
    inputs = {**transformer_inputs(transformer),
              "controlnet_block_samples": [torch.randn(2, 16, 32, generator=g) for _ in range(2)],
              "controlnet_single_block_samples": [torch.randn(2, 16, 32, generator=g) for _ in range(2)]}
    reference = euler_loop(transformer, 8, inputs)
    apply_recache(transformer, RecacheHookConfig(budget=3, mechanism=mechanism, num_inference_steps=8))
    try:
        assert torch.allclose(euler_loop(transformer, 8, inputs), reference, atol=1e-5)
    finally:
        remove_recache(transformer)
