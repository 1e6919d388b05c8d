"""Batched rollouts on per-row clocks (``sample_rollouts``) against separate runs, and the plan they follow."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recache.mechanisms import MECHANISMS, get_mechanism
from recache.sampling import get_sigmas_linear
from recache.sampling.cached import sample_cached
from recache.sampling.rollouts import row_plan, sample_rollouts
from recache.schedule import Schedule

STEPS = ([0, 2, 5, 9], [0, 1, 2, 3], [0, 7], [0, 4, 6, 8, 9], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0])


@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_rollouts_equal_separate_runs(tiny_dit, mechanism, guidance):
    masks = torch.stack([Schedule.from_steps(10, s).as_tensor() for s in STEPS])
    g = torch.Generator().manual_seed(3)
    noise, y = torch.randn(len(STEPS), 1, 8, 8, generator=g), torch.tensor([5, 5, 1, 9, 0, 3])
    together, passes = sample_rollouts(tiny_dit, noise, get_sigmas_linear(10), y, masks, get_mechanism(mechanism),
                                       guidance)
    for i in range(len(STEPS)):
        with torch.no_grad():
            alone, _ = sample_cached(tiny_dit, noise[i:i + 1], get_sigmas_linear(10), y[i:i + 1], masks[i:i + 1],
                                     get_mechanism(mechanism), guidance)
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=0)
    assert passes.tolist() == [len(s) for s in STEPS]


def test_rollouts_run_the_blocks_once_per_phase(tiny_dit):
    """G schedules of budget k cost k batched full passes, whichever steps they pick."""
    masks = torch.stack([Schedule.from_steps(10, s).as_tensor() for s in ([0, 2, 5, 9], [0, 1, 3, 8], [0, 4, 6, 7])])
    calls = []
    handle = tiny_dit.blocks[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        sample_rollouts(tiny_dit, torch.randn(3, 1, 8, 8), get_sigmas_linear(10), torch.tensor([1, 2, 3]), masks,
                        get_mechanism("reuse"), 2.0)
    finally:
        handle.remove()
    assert calls == [6, 6, 6, 6]  # 4 phases, each the 3 rows x 2 CFG branches together


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30).flatmap(lambda T: st.lists(st.sets(st.integers(1, T - 1)), min_size=1, max_size=6)
                                  .map(lambda sets: (T, sets))))
def test_plan_visits_every_step_of_every_row_once_in_order(case):
    T, sets = case
    masks = torch.stack([Schedule.from_steps(T, [0, *s]).as_tensor() for s in sets])
    seen = [[] for _ in sets]
    for kind, rows, steps in row_plan(masks):
        for n, row in enumerate(rows):
            assert (kind == "full") == bool(masks[row, steps[n]])
            seen[row].append(steps[n])
    assert all(s == list(range(T)) for s in seen)
    assert sum(kind == "full" for kind, _, _ in row_plan(masks)) == max(len(s) for s in sets) + 1
