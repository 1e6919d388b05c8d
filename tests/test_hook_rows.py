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
