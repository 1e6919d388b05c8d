import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recache.sampling import GuidedVelocity, get_sigmas, get_sigmas_linear, get_sigmas_shifted, sample_euler


@given(st.integers(1, 200), st.floats(0.1, 10.0))
def test_sigma_grids_are_monotone_from_one_to_zero(steps, shift):
    for sigmas in (get_sigmas_linear(steps), get_sigmas_shifted(steps, shift)):
        assert len(sigmas) == steps + 1
        assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
        assert (sigmas[1:] < sigmas[:-1]).all()


def test_shift_moves_sigmas_up():
    assert (get_sigmas_shifted(10, 3.0)[1:-1] > get_sigmas_linear(10)[1:-1]).all()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, 10_001])
def test_bad_step_counts(bad):
    with pytest.raises(ValueError, match="whole number from 1 to 10000"):
        get_sigmas_linear(bad)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'cosine'.*linear"):
        get_sigmas("cosine", 10)


def test_euler_is_exact_for_straight_paths():
    """For x_s = (1-s) x0 + s e the true velocity is e - x0; Euler follows the line exactly to x0."""
    x0, e = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    out = sample_euler(lambda x, s, c: e - x0, e, get_sigmas_shifted(7, 2.0), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, x0)


def test_callback_sees_every_step():
    seen = []
    sigmas = get_sigmas_linear(5)
    sample_euler(lambda x, s, c: torch.ones_like(x), torch.zeros(1, 1, 2, 2), sigmas, torch.zeros(1),
                 callback=seen.append)
    assert [d["i"] for d in seen] == list(range(5))
    assert torch.equal(torch.stack([d["sigma"] for d in seen]), sigmas[:-1])
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_next", "velocity", "denoised"}


def test_guidance_combines_branches(tiny_dit):
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    s = torch.tensor(0.4)
    v_c, v_u = tiny_dit(x, s, y), tiny_dit(x, s, torch.full_like(y, tiny_dit.null_class))
    torch.testing.assert_close(GuidedVelocity(tiny_dit, 3.0, tiny_dit.null_class)(x, s, y), v_u + 3.0 * (v_c - v_u),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(GuidedVelocity(tiny_dit, 1.0, tiny_dit.null_class)(x, s, y), v_c)
