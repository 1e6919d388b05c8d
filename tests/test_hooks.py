"""recache as diffusers hooks on tiny FLUX, Wan 2.1 and SD3 transformers and a whole tiny FluxPipeline (offline); every
other transformer diffusers registers blocks for is in ``test_hook_models.py``."""

from __future__ import annotations

import pytest
import torch
from tiny_diffusers import (
    euler_loop,
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_wan_transformer,
    transformer_inputs,
)

import recache
from recache.errors import RecacheError
from recache.hooks import RecacheHookConfig, apply_recache, model_fingerprint, remove_recache
from recache.hooks.schedule_cache import is_recache_enabled
from recache.hooks.transformers import transformer_blocks
from recache.policies.recache import ReCacheConfig, ReCachePolicy
from recache.schedule import Schedule

MAKERS = {"flux": tiny_flux_transformer, "wan": tiny_wan_transformer, "sd3": tiny_sd3_transformer}
FLUX_CALL = {"prompt": "a photo of a cat", "height": 64, "width": 64, "max_sequence_length": 16, "output_type": "pt"}


def block_runs(transformer) -> list[int]:
    """A counter of how often each block really runs (its attention module is only called then)."""
    count = [0]
    for block in transformer_blocks(transformer):
        attention = getattr(block, "attn", None) or block.attn1
        attention.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def flux_images(pipe, steps, seed=0, **kw):
    return pipe(**FLUX_CALL, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kw).images


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny_flux_pipeline()


@pytest.mark.parametrize("mechanism", ["reuse", "taylorseer", "hicache"])
@pytest.mark.parametrize("model", list(MAKERS))
def test_full_budget_is_exact_and_blocks_run_k_times(model, mechanism):
    transformer = MAKERS[model]()
    inputs, T = transformer_inputs(transformer), 10
    reference = euler_loop(transformer, T, inputs)
    runs = block_runs(transformer)
    n_blocks = len(transformer_blocks(transformer))
    apply_recache(transformer, RecacheHookConfig(budget=T, mechanism=mechanism, num_inference_steps=T))
    assert torch.equal(euler_loop(transformer, T, inputs), reference)
    remove_recache(transformer)
    for k in (1, 4, 7):
        runs[0] = 0
        stats = apply_recache(transformer, RecacheHookConfig(budget=k, mechanism=mechanism, num_inference_steps=T))
        cached = euler_loop(transformer, T, inputs)
        assert runs[0] == k * n_blocks
        assert [len(r["computed_steps"]) for r in stats.last.values()] == [k]
        error = ((cached - reference).norm() / reference.norm()).item()
        assert 0 < error < 0.5, error  # cached steps really change the output, and not into noise
        remove_recache(transformer)
    assert torch.equal(euler_loop(transformer, T, inputs), reference)  # removal restores the model bit for bit


@pytest.mark.parametrize("mechanism", ["reuse", "taylorseer"])
def test_half_precision_stays_half_precision(mechanism):
    transformer = tiny_flux_transformer().to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
              for k, v in transformer_inputs(transformer).items()}
    reference = euler_loop(transformer, 10, inputs).float()
    apply_recache(transformer, RecacheHookConfig(budget=4, mechanism=mechanism, num_inference_steps=10))
    out = euler_loop(transformer, 10, inputs)
    remove_recache(transformer)
    assert out.dtype == torch.bfloat16
    assert 0 < ((out.float() - reference).norm() / reference.norm()).item() < 0.5


def test_one_cache_at_a_time_with_diffusers_caches():
    from diffusers import FirstBlockCacheConfig

    transformer = tiny_flux_transformer()
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(RecacheError, match="a diffusers cache is enabled"):
        recache.enable(transformer, budget=3)
    transformer.disable_cache()
    recache.enable(transformer, budget=3)
    recache.disable(transformer)


def test_pipeline_full_budget_equals_uncached_and_each_cfg_branch_runs_k(flux_pipe):
    reference = flux_images(flux_pipe, 10)
    runs = block_runs(flux_pipe.transformer)
    n_blocks = len(transformer_blocks(flux_pipe.transformer))
    recache.enable(flux_pipe, budget=10)
    try:
        assert torch.equal(flux_images(flux_pipe, 10), reference)
        runs[0] = 0
        recache.disable(flux_pipe)
        recache.enable(flux_pipe, budget=4, mechanism="reuse")
        # true CFG: a "cond" and an "uncond" call per step
        flux_images(flux_pipe, 10, negative_prompt="dog", true_cfg_scale=2.0)
        summary = recache.summary(flux_pipe)
        assert summary.full_passes == {"cond": 4, "uncond": 4}
        assert runs[0] == 2 * 4 * n_blocks
        assert "4 computed / 6 cached of T=10" in str(summary)
    finally:
        recache.disable(flux_pipe)
    assert torch.equal(flux_images(flux_pipe, 10), reference)


def test_successive_calls_honour_their_own_step_counts_and_budgets(flux_pipe):
    runs = block_runs(flux_pipe.transformer)
    n_blocks = len(transformer_blocks(flux_pipe.transformer))
    recache.enable(flux_pipe, budget="4x")
    try:
        for steps, k in ((12, 3), (20, 5), (8, 2)):
            runs[0] = 0
            flux_images(flux_pipe, steps)
            last = recache.summary(flux_pipe).last["cond"]
            assert (last["T"], last["k"], len(last["computed_steps"])) == (steps, k, k)
            assert runs[0] == k * n_blocks
        assert recache.summary(flux_pipe).generations == 3
        recache.disable(flux_pipe)
        recache.enable(flux_pipe, budget=0.5)
        flux_images(flux_pipe, 10)
        assert recache.summary(flux_pipe).full_passes == {"cond": 5}
    finally:
        recache.disable(flux_pipe)


def test_cached_calls_are_deterministic_and_independent_of_earlier_calls(flux_pipe):
    recache.enable(flux_pipe, budget=4)
    try:
        first = flux_images(flux_pipe, 10, seed=3)
        flux_images(flux_pipe, 14, seed=5)
        assert torch.equal(flux_images(flux_pipe, 10, seed=3), first)  # state is reset at the end of every call
    finally:
        recache.disable(flux_pipe)


def flux_policy(transformer, T=10) -> ReCachePolicy:
    torch.manual_seed(0)
    policy = ReCachePolicy(ReCacheConfig(T=T, k_min=2, k_max=8, model=model_fingerprint(transformer),
                                         mechanism="taylorseer"))
    torch.nn.init.normal_(policy.mlp[-1].weight)  # an untrained but non-uniform policy
    return policy


def test_policy_places_the_budget_and_maps_to_other_step_counts(flux_pipe, tmp_path):
    policy = flux_policy(flux_pipe.transformer)
    policy.save_pretrained(tmp_path / "policy")
    recache.enable(flux_pipe, budget=4, policy=tmp_path / "policy")
    try:
        for steps in (10, 16):
            flux_images(flux_pipe, steps)
            last = recache.summary(flux_pipe).last["cond"]
            assert last["computed_steps"] == policy.schedule_for_steps(4, steps).steps
    finally:
        recache.disable(flux_pipe)
    assert policy.schedule_for_steps(4, 10).steps == policy.schedule(4).steps


@pytest.mark.parametrize("T", [3, 7, 10, 23, 50])
def test_policy_mapping_gives_exactly_k_steps(T):
    policy = flux_policy(tiny_flux_transformer())
    for k in range(1, T + 1):
        schedule = policy.schedule_for_steps(k, T, allow_extrapolate=True)
        assert (schedule.T, schedule.k, schedule.mask[0]) == (T, k, True)


def test_fixed_schedule_must_match_the_step_count(flux_pipe):
    schedule = Schedule.from_steps(10, [0, 2, 5, 9])
    recache.enable(flux_pipe, schedule=schedule)
    try:
        flux_images(flux_pipe, 10)
        assert recache.summary(flux_pipe).last["cond"]["computed_steps"] == [0, 2, 5, 9]
        with pytest.raises(RecacheError, match="schedule is for T=10 steps, but this call runs 12"):
            flux_images(flux_pipe, 12)
    finally:
        recache.disable(flux_pipe)
    exported = Schedule.from_dict(schedule.to_dict()).to_cache_dit()
    assert (exported["steps_computation_mask"] == [1, 0, 1, 0, 0, 1, 0, 0, 0, 1]
            and exported["num_inference_steps"] == 10)
    assert exported["steps_computation_policy"] == "static" and exported["max_warmup_steps"] == 0


def assert_untouched(pipe):
    assert not is_recache_enabled(pipe.transformer)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in pipe.transformer.modules())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"budget": 11, "num_inference_steps": 10}, "budget k=11 is not allowed"),
    ({"budget": 0}, "budget k=0 is not allowed"),
    ({"budget": "0.5x"}, "speed-up '0.5x' is not allowed"),
    ({"budget": 1.5}, "fraction 1.5 is not allowed"),
    ({"budget": 4, "mechanism": "delta"}, "cannot run as a diffusers hook"),
    ({"budget": 4, "policy": "mnist-dit-taylorseer"}, "trained for model 'mnist-dit'"),
    ({"schedule": Schedule.uniform(10, 3, model="mnist-dit")}, "made for model 'mnist-dit'"),
    ({}, "give a budget"),
    ({"budget": 4, "allow_extrapolate": True}, "allow_extrapolate applies to a policy"),
])
def test_bad_input_is_refused_and_leaves_the_pipeline_unmodified(flux_pipe, kwargs, message):
    with pytest.raises(RecacheError, match=message):
        recache.enable(flux_pipe, **kwargs)
    assert_untouched(flux_pipe)


def test_unsupported_transformer_is_named_in_one_line():
    with pytest.raises(RecacheError, match=r"^transformer Linear is not supported: it has no block list whose "
                                           r"blocks diffusers registers .*\)$"):
        recache.enable(torch.nn.Linear(2, 2), budget=3)


def test_double_enable_and_budget_above_the_call_steps(flux_pipe):
    recache.enable(flux_pipe, budget=12)
    try:
        with pytest.raises(RecacheError, match="already enabled"):
            recache.enable(flux_pipe, budget=4)
        with pytest.raises(RecacheError, match="budget k=12 is not allowed: .* from 1 to T=10"):
            flux_images(flux_pipe, 10)
        flux_images(flux_pipe, 14)  # the refused call left nothing behind
        assert recache.summary(flux_pipe).full_passes == {"cond": 12}
    finally:
        recache.disable(flux_pipe)
    assert_untouched(flux_pipe)


def test_bare_transformer_needs_a_step_count_and_refresh_sets_it():
    transformer = tiny_sd3_transformer()  # SD3 has no cache contexts: calls share the default state
    inputs = transformer_inputs(transformer)
    recache.enable(transformer, budget=3)
    with pytest.raises(RecacheError, match="cannot tell how many steps"):
        euler_loop(transformer, 6, inputs)
    recache.refresh(transformer, num_inference_steps=6)
    euler_loop(transformer, 6, inputs)
    euler_loop(transformer, 6, inputs)  # a second generation: the noise level rose
    summary = recache.summary(transformer)
    assert summary.generations == 2 and summary.full_passes == {"default": 3}
    recache.disable(transformer)
