import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recache.errors import RecacheError
from recache.policies import ReCacheConfig, ReCachePolicy


def _policy(T=12, k_min=2, k_max=8, seed=0, **kw) -> ReCachePolicy:
    policy = ReCachePolicy(ReCacheConfig(T=T, k_min=k_min, k_max=k_max, **kw))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    return policy


def test_zero_initialised_policy_is_uniform():
    policy = ReCachePolicy(ReCacheConfig(T=20, k_min=2, k_max=10))
    assert torch.equal(policy.logits(torch.tensor([3, 9])), torch.zeros(2, 19))
    torch.testing.assert_close(policy.entropy(torch.tensor([5])), torch.tensor([math.log(19)]))


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 30).flatmap(lambda T: st.tuples(st.just(T), st.lists(st.integers(1, T), min_size=1, max_size=6))),
       st.integers(0, 10**6))
def test_sampled_masks_have_exactly_k_steps_and_step_0(Tk, seed):
    T, ks = Tk
    policy = _policy(T=T, k_min=1, k_max=T)
    masks, logp = policy.sample(torch.tensor(ks), torch.Generator().manual_seed(seed))
    assert masks.sum(1).tolist() == ks and masks[:, 0].all()
    assert (logp <= 1e-6).all()


def test_log_prob_is_plackett_luce_over_ordered_picks():
    """Summed over every ordered choice of k - 1 candidates the probabilities are 1, and each matches the PL product."""
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    k = torch.tensor([3])  # two picks of four candidates
    total = 0.0
    for first, second in itertools.permutations(range(4), 2):
        rest = [c for c in range(4) if c not in (first, second)]
        order = torch.tensor([[first, second, *rest]])
        p = ReCachePolicy.log_prob(logits, order, k).exp().item()
        w = logits[0].exp()
        expected = (w[first] / w.sum() * w[second] / (w.sum() - w[first])).item()
        assert p == pytest.approx(expected, rel=1e-5)
        total += p
    assert total == pytest.approx(1.0, rel=1e-5)


def test_gumbel_top_k_first_pick_follows_the_softmax():
    policy = ReCachePolicy(ReCacheConfig(T=5, k_min=2, k_max=2))
    with torch.no_grad():
        policy.mlp[-1].bias.copy_(torch.tensor([1.0, 0.0, -1.0, 0.5]))
    masks, _ = policy.sample(torch.full((20000,), 2), torch.Generator().manual_seed(0))
    freq = masks[:, 1:].float().mean(0)
    torch.testing.assert_close(freq, policy.mlp[-1].bias.softmax(0), atol=0.015, rtol=0)


def test_log_prob_carries_the_gradient_of_the_policy():
    policy = _policy()
    _, logp = policy.sample(torch.tensor([4, 6]), torch.Generator().manual_seed(1))
    logp.sum().backward()
    assert policy.mlp[-1].weight.grad.abs().sum() > 0


def test_schedule_is_the_deterministic_top_k():
    policy = _policy(T=12)
    for k in range(2, 9):
        s = policy.schedule(k)
        logits = policy.logits(torch.tensor([k]))[0]
        assert s.k == k and s.mask[0]
        taken = torch.tensor(s.steps[1:]) - 1
        assert logits[taken].min() >= logits[[i for i in range(11) if i not in taken.tolist()]].max()
        assert s.metadata["source"] == "recache" and s.metadata["mechanism"] == "taylorseer"


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10**6))
def test_nested_mode_is_nested_with_exact_budgets(seed):
    policy = _policy(T=16, k_min=3, k_max=12, seed=seed)
    sets = [set(policy.schedule(k, nested=True).steps) for k in range(3, 13)]
    assert [len(s) for s in sets] == list(range(3, 13))
    assert all(a <= b for a, b in itertools.pairwise(sets))
    assert policy.schedule(3, nested=True).steps == policy.schedule(3).steps


def test_budget_outside_the_trained_range_needs_extrapolation():
    policy = _policy(T=12, k_min=3, k_max=6)
    with pytest.raises(RecacheError, match="budget 8 is outside the policy's trained range 3-6"):
        policy.schedule(8)
    assert policy.schedule(8, allow_extrapolate=True).k == 8
    with pytest.raises(RecacheError, match="budget k=13"):
        policy.schedule(13, allow_extrapolate=True)


def test_save_and_load_round_trip(tmp_path):
    policy = _policy(T=12, model="mnist-dit", mechanism="hicache", training={"alpha": 0.5})
    policy.save_pretrained(tmp_path / "p")
    loaded = ReCachePolicy.from_pretrained(tmp_path / "p", T=12, model="mnist-dit", mechanism="hicache")
    assert loaded.config == policy.config
    for k in range(2, 9):
        assert loaded.schedule(k).mask == policy.schedule(k).mask
    assert json.loads((tmp_path / "p" / "config.json").read_text())["training"] == {"alpha": 0.5}


@pytest.mark.parametrize("kwargs, pattern", [({"T": 50}, "trained for T = 12, not 50"),
                                             ({"model": "flux"}, "model = mnist-dit, not flux"),
                                             ({"mechanism": "reuse"}, "mechanism = taylorseer, not reuse")])
def test_loading_a_policy_for_another_setting_fails(tmp_path, kwargs, pattern):
    _policy(T=12).save_pretrained(tmp_path)
    with pytest.raises(RecacheError, match=pattern):
        ReCachePolicy.from_pretrained(tmp_path, **kwargs)


def test_corrupt_or_missing_artefacts_fail_clearly(tmp_path):
    with pytest.raises(RecacheError, match="config.json is missing"):
        ReCachePolicy.from_pretrained(tmp_path)
    _policy(T=12).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RecacheError, match="cannot be loaded"):
        ReCachePolicy.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"policy": "recache", "T": 12, "k_min": 9, "k_max": 3}')
    with pytest.raises(RecacheError, match="not a valid ReCache policy config.*missing fallback, hidden, mechanism"):
        ReCachePolicy.from_pretrained(tmp_path)
    config = {"policy": "recache", **ReCacheConfig(T=12, k_min=2, k_max=5).__dict__, "k_min": 9, "k_max": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecacheError, match="not a valid ReCache policy config.*empty"):
        ReCachePolicy.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RecacheError, match="policy config .*config.json cannot be read as JSON"):
        ReCachePolicy.from_pretrained(tmp_path)


def test_shipped_policies_load_for_the_embedded_model():
    from recache.mechanisms import MECHANISMS
    from recache.policies import NoiseLevelPolicy, load_policy, shipped_policies
    from recache.sampling.sigmas import get_sigmas

    assert shipped_policies() == sorted([*(f"mnist-dit-{m}" for m in MECHANISMS), "mnist-flux-taylorseer"])
    for m in MECHANISMS:  # v2: one policy for T = 20, 30, 50 on the linear and shift-3 grids
        policy = load_policy(f"mnist-dit-{m}", model="mnist-dit", mechanism=m)
        assert isinstance(policy, NoiseLevelPolicy)
        assert policy.config.settings == [{"T": T, "shift": s} for T in (20, 30, 50) for s in (1.0, 3.0)]
        assert policy.config.training["pairs"] < 900_000 and policy.config.training["rollouts"] > 0
        for T, grid in ((50, "linear"), (30, "shifted"), (20, "shifted:3")):
            assert [policy.schedule(k, sigmas=get_sigmas(grid, T)).k for k in policy.config.budgets(T)] == list(
                policy.config.budgets(T))


def test_shipped_flux_policy_is_for_the_shipped_flux_model():
    """v2, trained on the pipeline itself: exact k on every trained setting and between them (T = 28, FLUX's
    default), T = 60 refused."""
    from recache.hooks import model_fingerprint
    from recache.models.flux_digits import load_flux_digits
    from recache.policies import NoiseLevelPolicy, load_policy
    from recache.sampling.sigmas import get_sigmas

    transformer, _, _ = load_flux_digits()
    policy = load_policy("mnist-flux-taylorseer", model=model_fingerprint(transformer), mechanism="taylorseer")
    assert isinstance(policy, NoiseLevelPolicy)
    assert policy.config.settings == [{"T": T, "shift": s} for T in (20, 30, 50) for s in (1.0, 3.0)]
    for setting in policy.config.settings:
        sigmas = get_sigmas(f"shifted:{setting['shift']}", setting["T"])
        budgets = policy.config.budgets(setting["T"])
        assert [policy.schedule(k, sigmas=sigmas).k for k in budgets] == list(budgets)
    between = policy.schedule_for_steps(6, 28, sigmas=get_sigmas("shifted:3", 28))
    assert between.k == 6 and between.metadata["guard"] in ("interpolated", "uniform")
    assert len(policy.config.guard_ratios) == sum(len(policy.config.budgets(T)) for T in (20, 30, 50)) * 2
    with pytest.raises(RecacheError, match="T=60 is outside the trained range"):
        policy.schedule_for_steps(6, 60)
    assert policy.schedule_for_steps(6, 60, allow_extrapolate=True).k == 6


