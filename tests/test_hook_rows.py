"""Per-row schedules through the hooks: one call carries several schedules as one batch, each row computes or is
cached by its own plan, and equals the run of its schedule alone, on every supported tiny transformer and each
mechanism, and on whole pipelines with CFG as two calls (FLUX) or one batch (SD3)."""

from __future__ import annotations

import pytest
import torch
from test_hook_generations import SD3_CALL
from test_hook_models import SUPPORTED
from test_hooks import FLUX_CALL, block_runs
from tiny_diffusers import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_wan22_pipeline
from tiny_zoo import ZOO, tiny_euler

from recache.errors import RecacheError
from recache.hooks import RecacheHookConfig, apply_recache, pipeline_clock, remove_recache
from recache.hooks.transformers import transformer_blocks
from recache.schedule import Schedule

T = 6
A, B = Schedule.from_steps(T, [0, 2, 5]), Schedule.from_steps(T, [0, 1, 3, 4])  # steps 2, 5: A alone; 1, 3, 4: B
FIVE = [A, B, Schedule.from_steps(T, [0, 3]), Schedule.full(T), Schedule.from_steps(T, [0, 4])]
ROWS = [n for n in SUPPORTED if n != "Cosmos3OmniTransformer"]  # Cosmos 3 runs one unbatched sequence a call


def run(transformer, name, config, batch) -> tuple[torch.Tensor, dict]:
    stats = apply_recache(transformer, config)
    try:
        return tiny_euler(transformer, name, T, batch=batch), stats.last
    finally:
        remove_recache(transformer)


@pytest.mark.parametrize("mechanism", ["reuse", "taylorseer", "hicache"])
@pytest.mark.parametrize("name", ROWS)
def test_each_row_equals_the_run_of_its_schedule_alone(name, mechanism):
    """Five rows: the blocks run on the computing rows alone (the models' block arguments slice; PriorTransformer's
    per-head mask does not, so it runs the union). Two rows (with taylorseer): most models have an even token
    count, whose rotary embeddings could be rows, so they run the union."""
    transformer = ZOO[name].build(0)
    for schedules in (FIVE, [A, B]) if mechanism == "taylorseer" else (FIVE,):
        batch = len(schedules)
        rows, last = run(transformer, name, RecacheHookConfig(row_schedules=schedules, mechanism=mechanism), batch)
        for row, schedule in enumerate(schedules):
            alone = run(transformer, name, RecacheHookConfig(schedule=schedule, mechanism=mechanism), batch)[0]
            assert torch.allclose(rows[row], alone[row], atol=1e-5), (batch, row)
        record = next(iter(last.values()))
        assert record["row_passes"] == [s.k for s in schedules] and record["computed_steps"] == list(range(T))
    assert not torch.allclose(rows[0], rows[1], atol=1e-5)  # the schedules do differ (A and B)


def test_flux_cfg_branches_keep_their_rows_apart_and_passes_are_counted_per_row():
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = {**FLUX_CALL, "prompt": ["a cat", "a dog"], "negative_prompt": ["x", "y"], "true_cfg_scale": 2.0,
            "num_inference_steps": T}

    def images(schedules, prompts=(0, 1)):
        config = RecacheHookConfig(row_schedules=schedules, mechanism="taylorseer", clock=pipeline_clock(pipe))
        stats = apply_recache(pipe.transformer, config)
        try:
            kw = {**call, "prompt": [call["prompt"][i] for i in prompts],
                  "negative_prompt": [call["negative_prompt"][i] for i in prompts]}
            return pipe(**kw, generator=[torch.Generator().manual_seed(i) for i in prompts]).images, stats.last
        finally:
            remove_recache(pipe.transformer)

    runs = block_runs(pipe.transformer)
    together, last = images([A, B])
    assert {ctx: r["row_passes"] for ctx, r in last.items()} == {"cond": [3, 4], "uncond": [3, 4]}
    assert runs[0] == 2 * T * len(transformer_blocks(pipe.transformer))  # blocks called wherever a row computes
    for row, schedule in enumerate((A, B)):
        alone, _ = images([schedule], prompts=(row,))
        assert torch.allclose(together[row], alone[0], atol=1e-5)


def test_sd3_batched_cfg_gives_both_halves_of_the_batch_the_rows_schedules():
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def images(schedules, rows):
        stats = apply_recache(pipe.transformer, RecacheHookConfig(row_schedules=schedules, mechanism="reuse",
                                                                  clock=pipeline_clock(pipe)))
        try:
            out = pipe(**{**SD3_CALL, "prompt": ["a cat", "a dog"][: rows]}, num_inference_steps=T,
                       generator=[torch.Generator().manual_seed(i) for i in range(rows)]).images
            return out, stats.last
        finally:
            remove_recache(pipe.transformer)

    together, last = images([A, B], 2)
    assert last["default"]["row_passes"] == [3, 4]
    alone, _ = images([A], 1)
    assert torch.allclose(together[0], alone[0], atol=1e-5)


def test_row_schedules_bad_input_is_one_line():
    with pytest.raises(RecacheError, match="share one step count"):
        RecacheHookConfig(row_schedules=[A, Schedule.uniform(8, 3)])
    with pytest.raises(RecacheError, match="without a budget, schedule or policy"):
        RecacheHookConfig(row_schedules=[A], budget=3)
    with pytest.raises(RecacheError, match="Wan 2.2's experts"):
        pipe = tiny_wan22_pipeline()
        apply_recache([pipe.transformer, pipe.transformer_2], RecacheHookConfig(row_schedules=[A, B]))
    transformer = ZOO["FluxTransformer2DModel"].build(0)
    apply_recache(transformer, RecacheHookConfig(row_schedules=[A, B, B]))
    try:
        with pytest.raises(RecacheError, match="a call of 2 batch rows cannot follow 3 row schedules"):
            tiny_euler(transformer, "FluxTransformer2DModel", T)
    finally:
        remove_recache(transformer)


def attention_rows(transformer) -> list[int]:
    """The batch rows each block's attention really ran on, call by call (counted apart from the masks)."""
    rows = []

    def note(module, args, kwargs):
        rows.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[0])

    for block in transformer_blocks(transformer):
        (getattr(block, "attn", None) or block.attn1).register_forward_pre_hook(note, with_kwargs=True)
    return rows


def test_sd3_batched_cfg_runs_the_unconditional_half_of_the_batch_by_its_own_budget():
    """uncond_budget on SD3 (both branches in one call, [uncond; cond] rows): each half realises its own k, counted
    by the rows the attention runs on, and the images are those of the same plans given as row schedules."""
    import recache

    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    blocks = len(transformer_blocks(pipe.transformer))
    rows = attention_rows(pipe.transformer)

    def images():
        call = {**SD3_CALL, "prompt": ["a cat", "a dog"], "num_inference_steps": T}
        return pipe(**call, generator=[torch.Generator().manual_seed(i) for i in range(2)]).images

    recache.enable(pipe, budget=4, uncond_budget=2, mechanism="reuse")
    halves, summary = images(), recache.summary(pipe)
    recache.disable(pipe)
    record = summary.last["default"]
    assert (record["k"], record["row_passes"], record["by_halves"]) == ([2, 4], [2, 4], True)
    assert sum(rows) == blocks * 2 * (2 + 4)  # 2 prompts per half: uncond rows run 2 steps, cond rows 4
    assert "k=2 for the unconditional half of the batch and 4 for the conditional, realised 2 and 4" in str(summary)
    uncond, cond = Schedule.uniform(T, 2), Schedule.uniform(T, 4)
    apply_recache(pipe.transformer, RecacheHookConfig(row_schedules=[uncond, uncond, cond, cond], mechanism="reuse",
                                                      clock=pipeline_clock(pipe)))
    try:
        assert torch.equal(halves, images())
    finally:
        remove_recache(pipe.transformer)
    recache.enable(pipe, budget=4, mechanism="reuse")  # without uncond_budget both halves share the budget
    assert not torch.equal(halves, images())
    recache.disable(pipe)


def test_flux_true_cfg_plans_the_uncond_context_by_its_own_budget():
    import recache

    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    runs = block_runs(pipe.transformer)
    recache.enable(pipe, budget=4, uncond_budget="3x")
    pipe(**FLUX_CALL, negative_prompt="x", true_cfg_scale=2.0, num_inference_steps=T)
    last = recache.summary(pipe).last
    recache.disable(pipe)
    assert {ctx: (r["k"], len(r["computed_steps"])) for ctx, r in last.items()} == {"cond": (4, 4), "uncond": (2, 2)}
    assert runs[0] == (4 + 2) * len(transformer_blocks(pipe.transformer))


def test_uncond_budget_bad_input_is_one_line():
    with pytest.raises(RecacheError, match="uncond_budget goes with a budget"):
        RecacheHookConfig(schedule=A, uncond_budget=2)
    with pytest.raises(RecacheError, match="uncond_budget goes with a budget"):
        RecacheHookConfig(row_schedules=[A], uncond_budget=2)
    with pytest.raises(RecacheError, match="budget"):
        RecacheHookConfig(budget=3, uncond_budget=0)
    with pytest.raises(RecacheError, match="k=7"):
        RecacheHookConfig(budget=3, uncond_budget=7, num_inference_steps=T)


def repeated_rows(inputs: dict, rows: list[int]) -> dict:
    """A FLUX call's inputs with its batch rows taken in the order ``rows`` (the ids have no batch axis)."""
    return {key: [s[rows] for s in v] if isinstance(v, list) else v if key.endswith("_ids") else v[rows]
            for key, v in inputs.items()}


@pytest.mark.parametrize("controlnet", [False, True])
def test_equal_rows_run_the_blocks_once_while_their_inputs_stay_equal(controlnet):
    """Rows 0 and 1 share their prompt and noise and schedules A and C share steps 0 and 2: the blocks run them once
    there, and every row still equals its run alone (five rows: the 24 tokens' rotary embeddings are not rows). With
    ControlNet residuals that differ between rows 0 and 1 after the first single block, the rows are compared again
    where the model adds them and the last block runs both; from then on they differ."""
    from tiny_diffusers import euler_loop, tiny_flux_transformer, transformer_inputs

    transformer = tiny_flux_transformer()
    seen = attention_rows(transformer)
    inputs = repeated_rows(transformer_inputs(transformer, batch=4), [0, 0, 1, 2, 3])
    if controlnet:
        g = torch.Generator().manual_seed(1)
        inputs["controlnet_block_samples"] = [torch.randn(1, 16, 32, generator=g).repeat(5, 1, 1) for _ in range(2)]
        inputs["controlnet_single_block_samples"] = [torch.randn(5, 16, 32, generator=g) for _ in range(2)]
    schedules = [A, Schedule.from_steps(T, [0, 2, 4]), A, A, A]
    stats = apply_recache(transformer, RecacheHookConfig(row_schedules=schedules, mechanism="taylorseer",
                                                         num_inference_steps=T))
    try:
        together = euler_loop(transformer, T, inputs)
    finally:
        remove_recache(transformer)
    # steps 0 and 2: rows 0 and 1 once; with ControlNet, the last block of step 0 runs all five rows, and by step 2
    # rows 0 and 1 differ; step 4: row 1 alone; step 5: rows 0, 2, 3 and 4, which differ
    steps_0_2 = [4, 4, 4, 5] + [5] * 4 if controlnet else [4] * 8
    assert seen == steps_0_2 + [1] * 4 + [4] * 4
    assert stats.last["cond"]["shared_block_runs"] == (3 if controlnet else 8)
    assert stats.last["cond"]["row_passes"] == [3] * 5
    for row, schedule in enumerate(schedules):
        apply_recache(transformer, RecacheHookConfig(schedule=schedule, mechanism="taylorseer", num_inference_steps=T))
        try:
            alone = euler_loop(transformer, T, repeated_rows(inputs, [row]))
        finally:
            remove_recache(transformer)
        assert torch.allclose(together[row], alone[0], atol=1e-5), row


def test_sd3_batched_cfg_merges_equal_rows_within_each_half():
    """SD3 batches [uncond; cond]: two rows of one prompt and seed under schedules that share steps 0 and 2 are two
    equal pairs of rows there (one per branch), each run once; each image equals its schedule's run alone."""
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    schedules = [A, Schedule.from_steps(T, [0, 2, 4])]

    def images(rows):
        stats = apply_recache(pipe.transformer, RecacheHookConfig(row_schedules=rows, mechanism="taylorseer",
                                                                  clock=pipeline_clock(pipe)))
        try:
            out = pipe(**{**SD3_CALL, "prompt": ["a cat"] * len(rows)}, num_inference_steps=T,
                       generator=[torch.Generator().manual_seed(0) for _ in rows]).images
            return out, stats.last["default"]
        finally:
            remove_recache(pipe.transformer)

    together, record = images(schedules)
    assert record["shared_block_runs"] == 2 * 2 * len(transformer_blocks(pipe.transformer))  # 2 steps, 2 branches
    for row, schedule in enumerate(schedules):
        assert torch.allclose(together[row], images([schedule])[0][0], atol=1e-5)
