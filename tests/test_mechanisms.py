import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recache.errors import RecacheError
from recache.mechanisms import MECHANISMS, get_mechanism
from recache.mechanisms.hicache import HiCache, hermite
from recache.mechanisms.taylorseer import TaylorSeer
from recache.sampling import GuidedVelocity, get_sigmas_linear, sample_euler
from recache.sampling.cached import sample_cached
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule

ALL = list(MECHANISMS)


def _tiny_run(model, schedule_masks, mechanism, guidance=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = schedule_masks.shape[0]
    noise, y = torch.randn(rows, 1, 8, 8, generator=g), torch.arange(rows) % 10
    return sample_cached(model, noise, get_sigmas_linear(schedule_masks.shape[1]), y, schedule_masks,
                         get_mechanism(mechanism), guidance)


@pytest.mark.parametrize("mechanism", ALL)
def test_full_budget_is_the_uncached_result_bit_for_bit(tiny_dit, mechanism):
    T = 12
    g = torch.Generator().manual_seed(0)
    noise, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1, 2, 3])
    reference, _ = sample_cached(tiny_dit, noise, get_sigmas_linear(T), y, guidance=2.0)
    out, passes = sample_cached(tiny_dit, noise, get_sigmas_linear(T), y, torch.ones(3, T, dtype=torch.bool),
                                get_mechanism(mechanism), 2.0)
    assert torch.equal(out, reference)
    assert passes.tolist() == [T] * 3


def test_uncached_sampler_is_euler_on_the_model_forward(tiny_dit):
    """Computing every step's conditioning in one batch changes nothing beyond float rounding."""
    g = torch.Generator().manual_seed(1)
    noise, y, sigmas = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1, 2, 3]), get_sigmas_linear(12)
    direct = sample_euler(GuidedVelocity(tiny_dit, 2.0, tiny_dit.null_class), noise, sigmas, y)
    torch.testing.assert_close(sample_cached(tiny_dit, noise, sigmas, y, guidance=2.0)[0], direct, atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(2, 16).flatmap(lambda T: st.tuples(st.just(T),
                                                      st.lists(st.booleans(), min_size=T - 1, max_size=T - 1))),
       st.sampled_from(ALL))
def test_realised_full_passes_equal_k(tiny_dit, Tmask, mechanism):
    T, rest = Tmask
    schedule = Schedule((True, *rest))
    out, passes = _tiny_run(tiny_dit, schedule.as_tensor()[None].repeat(2, 1), mechanism)
    assert passes.tolist() == [schedule.k] * 2
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mechanism", ALL)
def test_blocks_run_exactly_k_times(tiny_dit, mechanism):
    """Count real executions of the first and last block with forward hooks."""
    first, last = [], []
    hooks = [tiny_dit.blocks[0].register_forward_hook(lambda m, a, out: first.append(1)),
             tiny_dit.blocks[-1].register_forward_hook(lambda m, a, out: last.append(1))]
    schedule = Schedule.from_steps(10, [0, 3, 4, 8])
    _tiny_run(tiny_dit, schedule.as_tensor()[None], mechanism)
    for h in hooks:
        h.remove()
    cached = [i for i in range(10) if i not in schedule.steps]
    if mechanism == "delta":  # by design: front half at early cached steps (i < T/2), rear half at late ones
        assert (len(first), len(last)) == (schedule.k + sum(i < 5 for i in cached),
                                           schedule.k + sum(i >= 5 for i in cached))
    else:
        assert len(first) == len(last) == schedule.k


@pytest.mark.parametrize("mechanism", ALL)
def test_batched_rollouts_equal_separate_runs(tiny_dit, mechanism):
    masks = torch.stack([Schedule.from_steps(10, s).as_tensor()
                         for s in ([0, 2, 5, 9], [0, 1, 2, 3], [0, 7], [0, 4, 6, 8, 9])])
    g = torch.Generator().manual_seed(3)
    noise, y = torch.randn(1, 1, 8, 8, generator=g).repeat(4, 1, 1, 1), torch.tensor([5] * 4)
    batched, passes = sample_cached(tiny_dit, noise, get_sigmas_linear(10), y, masks, get_mechanism(mechanism), 2.0)
    for i in range(4):
        single, _ = sample_cached(tiny_dit, noise[i:i + 1], get_sigmas_linear(10), y[i:i + 1], masks[i:i + 1],
                                  get_mechanism(mechanism), 2.0)
        torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=0)
    assert passes.tolist() == masks.sum(1).tolist()


@pytest.mark.parametrize("order, coefficients", [(1, [0.5, -2.0]), (2, [0.5, -2.0, 0.25])])
@pytest.mark.parametrize("steps", [[0, 1, 2], [0, 3, 4], [0, 2, 7], [0, 1, 9, 10]])
def test_taylorseer_is_exact_on_polynomials_with_uneven_gaps(order, coefficients, steps):
    mech = TaylorSeer(order=order)
    mech.reset(rows=2, steps=20)
    feature = torch.randn(2, 3, 4)

    def poly(t):
        return sum(c * t ** j for j, c in enumerate(coefficients)) * feature

    h_in = torch.zeros(2, 3, 4)
    for s in steps:
        mech.record(s, slice(None), h_in, h_in + poly(float(s)))
    for i in (steps[-1] + 1, steps[-1] + 3, steps[-1] + 6):
        torch.testing.assert_close(mech.cached_pass(i, slice(None), h_in, None, []), poly(float(i)),
                                   rtol=1e-4, atol=1e-4)


def test_taylorseer_falls_back_to_reuse_after_one_step():
    mech = TaylorSeer(order=2)
    mech.reset(rows=1, steps=10)
    r = torch.randn(1, 2, 2)
    mech.record(0, slice(None), torch.zeros_like(r), r)
    torch.testing.assert_close(mech.cached_pass(3, slice(None), torch.ones_like(r), None, []), 1 + r)


def test_hermite_polynomials_and_hicache_damping():
    y = torch.tensor(0.7)
    assert hermite(0, y) == 1.0
    torch.testing.assert_close(hermite(1, y), 2 * y)
    torch.testing.assert_close(hermite(2, y), 4 * y ** 2 - 2)
    torch.testing.assert_close(hermite(3, y), 8 * y ** 3 - 12 * y)
    mech = HiCache(order=1, scale=0.5)  # order 1: Taylor with the slope damped by 2 * scale^2 = 0.5
    mech.reset(rows=1, steps=10)
    for s in (0, 2):
        mech.record(s, slice(None), torch.zeros(1, 1), torch.full((1, 1), float(s)))
    torch.testing.assert_close(mech.cached_pass(4, slice(None), torch.zeros(1, 1), None, []),
                               torch.tensor([[2.0 + 0.5 * 2.0]]))


def test_unknown_mechanism_is_named():
    with pytest.raises(RecacheError, match="unknown mechanism 'fora'.*taylorseer"):
        get_mechanism("fora")
    with pytest.raises(RecacheError, match="bad options for mechanism 'taylorseer'"):
        get_mechanism("taylorseer", order=5)


def test_mechanisms_are_not_step_skip_on_the_trained_model():
    """Each feature mechanism differs from output reuse (they would silently degenerate otherwise)."""
    pipe = DigitPipeline.from_pretrained("mnist-dit", steps=20)
    schedule = Schedule.uniform(20, 5)
    classes, seeds = torch.tensor([2, 8]), [900_001, 900_002]
    skip, _ = pipe.sample_with(schedule, "step-skip", classes, seeds)
    for mechanism in ("reuse", "delta", "taylorseer", "hicache"):
        out, _ = pipe.sample_with(schedule, mechanism, classes, seeds)
        assert (out - skip).abs().max() > 1e-3, mechanism


def test_step_skip_is_euler_on_the_computed_steps():
    pipe = DigitPipeline.from_pretrained("mnist-dit", steps=20)
    schedule = Schedule.from_steps(20, [0, 4, 5, 12, 19])
    classes, seeds = torch.tensor([4]), [900_003]
    out, _ = pipe.sample_with(schedule, "step-skip", classes, seeds)
    sub = torch.cat([pipe.sigmas[schedule.steps], pipe.sigmas[-1:]])
    direct = sample_euler(pipe.velocity, pipe.noise(seeds), sub, classes)
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=0)
