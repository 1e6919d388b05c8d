"""Where a generation starts and ends under the diffusers hooks, on whole tiny SD3 and FLUX pipelines (txt2img and
img2img) and on transformers driven directly: each call is planned for its own steps, passes are counted by the
blocks' attention calls, a call leaves nothing behind that changes the next, and calls inside a step are that step."""

from __future__ import annotations

import pytest
import torch
from test_hooks import block_runs
from tiny_diffusers import (
    euler_loop,
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_sd3_pipeline,
    tiny_wan_pipeline,
    transformer_inputs,
)

import recache
from recache.errors import RecacheError, RecacheWarning
from recache.hooks.clock import StepPosition, next_position
from recache.hooks.schedule_cache import recache_stats
from recache.hooks.transformers import transformer_blocks

SD3_CALL = {"prompt": "a photo of a cat", "height": 32, "width": 32, "max_sequence_length": 16, "output_type": "pt"}
SLG = {"skip_guidance_layers": [1], "skip_layer_guidance_stop": 0.5}  # steps 1-4 of 10 make a call without layer 1
FLUX_CALL = {**SD3_CALL, "height": 64, "width": 64}


WAN_CALL = {"prompt": "a cat", "negative_prompt": "a dog", "height": 32, "width": 32, "num_frames": 1,
            "max_sequence_length": 16, "output_type": "latent"}


def images(pipe, steps=10, **kw):
    name = type(pipe).__name__
    if name == "WanPipeline":
        return pipe(**WAN_CALL, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kw).frames
    call = FLUX_CALL if "Flux" in name else SD3_CALL
    return pipe(**call, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kw).images


def held_tensors(pipe) -> int:
    """How many streams of mechanism state the hooks still hold."""
    hook = pipe.transformer._diffusers_hook.get_hook("recache_call")
    return sum(len(state.streams) for state in hook.state_manager._state_cache.values())


def full_budget_equals_uncached(pipe, **kw) -> torch.Tensor:
    """The uncached images of a call, checked equal bit for bit to the same call under recache at k = T."""
    uncached = images(pipe, **kw)
    recache.enable(pipe, budget=1.0)
    try:
        assert torch.equal(images(pipe, **kw), uncached)
    finally:
        recache.disable(pipe)
    return uncached


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny_sd3_pipeline()


def test_sd3_ends_each_call_clean_and_the_next_call_equals_a_fresh_one(sd3_pipe):
    runs, n_blocks = block_runs(sd3_pipe.transformer), len(transformer_blocks(sd3_pipe.transformer))
    recache.enable(sd3_pipe, budget=4)
    try:
        fresh = images(sd3_pipe)
        assert held_tensors(sd3_pipe) == 0 and recache.summary(sd3_pipe).generations == 1
        images(sd3_pipe, steps=7, **SLG)
        runs[0] = 0
        assert torch.equal(images(sd3_pipe), fresh)
        assert runs[0] == 4 * n_blocks and recache.summary(sd3_pipe).generations == 3

        def stop_at_step_4(pipeline, step, timestep, kwargs):
            if step == 4:
                raise KeyboardInterrupt
            return kwargs

        with pytest.raises(KeyboardInterrupt):
            images(sd3_pipe, callback_on_step_end=stop_at_step_4)
        assert torch.equal(images(sd3_pipe), fresh)
        assert [call["default"].get("cut_short", False) for call in recache_stats(sd3_pipe.transformer).calls[-2:]] \
            == [True, False]
    finally:
        recache.disable(sd3_pipe)


def test_skip_layer_guidance_calls_are_part_of_their_step(sd3_pipe):
    runs, n_blocks = block_runs(sd3_pipe.transformer), len(transformer_blocks(sd3_pipe.transformer))
    uncached = full_budget_equals_uncached(sd3_pipe, **SLG)
    recache.enable(sd3_pipe, budget=4)
    try:
        runs[0] = 0
        cached = images(sd3_pipe, **SLG)
        record, text = recache.summary(sd3_pipe).last["default"], str(recache.summary(sd3_pipe))
    finally:
        recache.disable(sd3_pipe)
    assert cached.shape == uncached.shape and 0 < (cached - uncached).norm() / uncached.norm() < 0.5
    # uniform k = 4 of 10 computes 0, 3, 6, 9; the skip-layer calls at steps 1-4 run at 1 (nothing of theirs yet) and
    # at 3 (a computing step), and are filled from their own stream at 2 and 4
    assert record["computed_steps"] == [0, 3, 6, 9] and (record["extra_calls"], record["extra_passes"]) == (4, 2)
    assert runs[0] == 4 * n_blocks + 2 * (n_blocks - 1)
    assert "4 further call(s) inside steps (e.g. skip-layer guidance), 2 of them ran the blocks" in text
    assert "speed-up 2.33x in transformer passes" in text  # (10 + 4) calls over (4 + 2) passes


@pytest.mark.parametrize("make", [tiny_sd3_pipeline, tiny_flux_pipeline], ids=["sd3", "flux"])
def test_img2img_is_planned_for_the_steps_it_runs(make):
    pipe = make(img2img=True)
    runs, n_blocks = block_runs(pipe.transformer), len(transformer_blocks(pipe.transformer))
    size = FLUX_CALL["height"] if "Flux" in type(pipe).__name__ else SD3_CALL["height"]
    init = {"image": torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)), "strength": 0.6}
    full_budget_equals_uncached(pipe, **init)
    recache.enable(pipe, budget="2x")
    try:
        runs[0] = 0
        images(pipe, **init)  # strength 0.6 of 10 steps runs the last 6: k = 3
        record = recache.summary(pipe).last["default"]
        assert (record["T"], record["k"], record["computed_steps"], record["cached_steps"]) == (6, 3, [0, 2, 5], 3)
        assert runs[0] == 3 * n_blocks and "speed-up 2.00x" in str(recache.summary(pipe))
    finally:
        recache.disable(pipe)


def test_a_plan_for_other_steps_on_a_transformer_driven_directly_is_named():
    transformer = tiny_flux_transformer()
    inputs = transformer_inputs(transformer)
    recache.enable(transformer, budget=7, num_inference_steps=28)
    try:
        euler_loop(transformer, 8, inputs, context=None)
        with pytest.warns(RecacheWarning, match=r"ran 8 of the T=28 steps .* \(computed 2 of k=7\)"):
            euler_loop(transformer, 8, inputs, context=None)
        first = recache_stats(transformer).calls[0]["default"]
        assert first["cut_short"] and first["computed_steps"] == [0, 4]
        euler_loop(transformer, 8, inputs)  # a loop that says its step count gets a plan for it
        assert recache_stats(transformer).current["cond"]["T"] == 8
        recache.refresh(transformer, num_inference_steps=7)
        with pytest.raises(RecacheError, match="runs more than the T=7 steps it was planned for"):
            euler_loop(transformer, 8, inputs, context=None)
    finally:
        recache.disable(transformer)


def test_a_second_call_at_the_same_noise_level_is_part_of_its_step():
    transformer = tiny_flux_transformer()
    inputs, T = transformer_inputs(transformer), 6
    runs, n_blocks = block_runs(transformer), len(transformer_blocks(transformer))
    recache.enable(transformer, budget=3, num_inference_steps=T)
    try:
        sigmas = torch.linspace(1, 0, T + 1)
        for i in range(T):
            with torch.no_grad():
                for _ in range(2):  # e.g. a guidance branch of its own, in the same (default) context
                    transformer(**inputs, timestep=sigmas[i].expand(2), return_dict=False)
        record = recache.summary(transformer).last["default"]
    finally:
        recache.disable(transformer)
    assert record["computed_steps"] == [0, 2, 5] and (record["extra_calls"], record["extra_passes"]) == (6, 3)
    assert runs[0] == 6 * n_blocks


def test_direct_positions_follow_the_context_then_the_noise_level():
    start = next_position(None, None, 1.0, None, 10)
    assert (start.step, start.steps) == (0, 10)
    same, later = next_position(start, 1.0, 1.0, None, None), next_position(start, 1.0, 0.9, None, None)
    assert same is start and (later.call, later.step) == (start.call, 1)
    assert next_position(later, 0.9, 1.0, None, None).call is not start.call  # the noise rose: a new generation
    by_context = next_position(StepPosition(start.call, 5, 10), None, None, 2, 10)
    assert by_context.call is not start.call and by_context.step == 2
    assert next_position(StepPosition(start.call, 5, 10), None, None, 5, None).call is start.call
    counted = next_position(StepPosition(start.call, 9, 10), None, None, None, None)
    assert counted.call is not start.call and counted.step == 0  # no timestep: a generation ends after its steps


def test_a_loop_of_ones_own_after_pipeline_calls_starts_its_own_generations():
    pipe = tiny_flux_pipeline()
    inputs = transformer_inputs(pipe.transformer, batch=1)
    recache.enable(pipe, budget=3, num_inference_steps=6)
    try:
        images(pipe, steps=8)
        euler_loop(pipe.transformer, 6, inputs, context=None)  # the scheduler's call is over: steps by noise level
        record = recache_stats(pipe.transformer).last["default"]
        assert (record["T"], record["computed_steps"]) == (6, [0, 2, 5])
    finally:
        recache.disable(pipe)


def test_wan_with_unipc_runs_each_branch_to_its_budget_and_ends_clean():
    pipe = tiny_wan_pipeline()
    runs, n_blocks = block_runs(pipe.transformer), len(transformer_blocks(pipe.transformer))
    full_budget_equals_uncached(pipe)
    recache.enable(pipe, budget=4)
    try:
        runs[0] = 0
        first = images(pipe)
        summary = recache.summary(pipe)
        assert summary.full_passes == {"cond": 4, "uncond": 4} and runs[0] == 2 * 4 * n_blocks
        assert summary.last["cond"]["computed_steps"] == [0, 3, 6, 9] and held_tensors(pipe) == 0
        images(pipe, steps=7)
        assert torch.equal(images(pipe), first)
    finally:
        recache.disable(pipe)


def test_apply_recache_with_the_pipeline_clock_plans_each_call_as_enable_does(sd3_pipe):
    from recache.hooks import RecacheHookConfig, apply_recache, pipeline_clock, remove_recache

    stats = apply_recache(sd3_pipe.transformer, RecacheHookConfig(budget="2x", clock=pipeline_clock(sd3_pipe)))
    try:
        for steps in (8, 12):
            images(sd3_pipe, steps=steps)
            assert (stats.last["default"]["T"], len(stats.last["default"]["computed_steps"])) == (steps, steps // 2)
    finally:
        remove_recache(sd3_pipe.transformer)
