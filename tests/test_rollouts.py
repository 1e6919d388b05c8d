"""Batched rollouts on per-row clocks (``sample_rollouts``) against separate runs, and the plan they follow."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recache.mechanisms import MECHANISMS, get_mechanism
from recache.mechanisms.base import distinct_rows
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


@pytest.mark.parametrize("mechanism", ["taylorseer", "delta", "step-skip"])
def test_rows_of_one_pair_run_the_blocks_once_until_their_schedules_differ(tiny_dit, mechanism):
    """Three schedules on one pair (one noise, one class) and one on another: until a schedule's steps differ from
    another's, their rows are equal and the blocks run on one of them; each row still equals its separate run."""
    steps = ([0, 2, 5, 9], [0, 2, 6, 9], [0, 3, 5, 8], [0, 2, 5, 9])
    masks = torch.stack([Schedule.from_steps(10, s).as_tensor() for s in steps])
    first = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    noise, y = torch.cat([first, first, first, torch.randn(1, 1, 8, 8)]), torch.tensor([5, 5, 5, 5])
    rows = []
    handle = tiny_dit.blocks[0].register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        together, passes = sample_rollouts(tiny_dit, noise, get_sigmas_linear(10), y, masks, get_mechanism(mechanism),
                                           2.0)
    finally:
        handle.remove()
    if mechanism != "delta":  # delta's cached steps run the front blocks too
        assert rows == [4, 6, 8, 8]  # x 2 CFG branches: step 0 two kinds of row; step 2 rows 0 and 1 still equal
    assert sum(rows) < 8 * len(rows)
    for i in range(len(steps)):
        alone, _ = sample_cached(tiny_dit, noise[i:i + 1], get_sigmas_linear(10), y[i:i + 1], masks[i:i + 1],
                                 get_mechanism(mechanism), 2.0)
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=0)
    assert passes.tolist() == [4, 4, 4, 4]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=12), st.integers(0, 2**16))
def test_distinct_rows_merges_exactly_the_equal_rows(kinds, seed):
    g = torch.Generator().manual_seed(seed)
    h, c = torch.randn(4, 3, 5, generator=g)[kinds], torch.randn(4, 2, generator=g)[kinds]
    c[0, 0] += 1.0 if len(kinds) > 1 and kinds[0] == kinds[-1] else 0.0  # row 0 differs from its kind by c alone
    found = distinct_rows(h, c)
    expected = len({(k, r == 0) for r, k in enumerate(kinds)} if len(kinds) > 1 and kinds[0] == kinds[-1]
                   else set(kinds))
    if found is None:
        assert expected == len(kinds)
    else:
        first, inverse = found
        assert len(first) == expected
        assert torch.equal(h[first][inverse], h) and torch.equal(c[first][inverse], c)


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
