"""ReCache v2: the noise-level policy (any T and grid, exact k, trained range) and its expert-iteration trainer."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from recache.errors import RecacheError
from recache.io import read_jsonl
from recache.policies import NoiseLevelConfig, NoiseLevelPolicy, ReCachePolicy, expert_training, load_policy
from recache.policies.expert_iteration import ExpertConfig, relocations
from recache.policies.expert_training import train_noise_level
from recache.sampling.pipeline import DigitPipeline
from recache.sampling.sigmas import fit_shift, get_sigmas
from recache.schedule import Schedule

TRAINED = NoiseLevelConfig(settings=[{"T": 20, "shift": 1.0}, {"T": 50, "shift": 3.0}], k_fraction=[0.1, 0.5])
SHORT = ExpertConfig(steps=(6, 8), shifts=(1.0, 3.0), k_fraction=(0.25, 0.5), rounds=3, budgets_per_round=3,
                     samples=2, neighbours=3, pairs=2, distil_steps=3, final_steps=6, hidden=16, seed=3)


def _random_policy(config=TRAINED, seed=0):
    torch.manual_seed(seed)
    policy = NoiseLevelPolicy(config)
    with torch.no_grad():
        policy.mlp[-1].weight.normal_()
    return policy.eval()


@settings(max_examples=40, deadline=None)
@given(T=st.integers(2, 120), shift=st.floats(0.2, 12), data=st.data())
def test_exact_budget_on_any_step_count_and_grid(T, shift, data):
    k = data.draw(st.integers(1, T))
    sigmas = get_sigmas(f"shifted:{shift}", T)
    schedule = _random_policy().schedule(k, sigmas=sigmas, allow_extrapolate=True)
    assert (schedule.T, schedule.k, schedule.mask[0]) == (T, k, True)
    sampled = _random_policy().sample(torch.tensor([k, k]), sigmas, torch.Generator().manual_seed(0))
    assert sampled.sum(1).tolist() == [k, k] and sampled[:, 0].all()


def test_fit_shift_recognises_shifted_grids_and_flux_dynamic_shift():
    for shift in (0.5, 1.0, 2.0, 3.0, 7.5):
        fitted, gap = fit_shift(get_sigmas(f"shifted:{shift}", 28))
        assert fitted == pytest.approx(shift, rel=1e-5) and gap < 1e-5
    mu = 1.15  # FLUX at 1024x1024: sigma = e^mu / (e^mu + 1/t - 1), without the final 0
    t = torch.linspace(1, 1 / 28, 28, dtype=torch.float64)
    assert fit_shift(torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + 1 / t - 1))[0] == pytest.approx(
        torch.exp(torch.tensor(mu)).item(), rel=1e-5)
    assert fit_shift(torch.linspace(1, 0, 31) ** 3)[1] > 0.01  # not a shifted grid


@pytest.mark.parametrize("T, grid, k, pattern", [
    (60, "linear", 10, "T=60 is outside the trained range"),
    (30, "shifted:6", 6, "a grid of shift 6 is outside"),
    (50, "linear", 2, r"budget k=2 \(k/T = 0.04\) is outside"),
    (20, "linear", 15, "budget k=15"),
    (20, "shifted:3", 5, "T=20 with a grid of shift 3 is outside"),
    (40, "linear", 8, "T=40 is outside"),
])
def test_settings_outside_the_trained_range_are_refused_unless_extrapolating(T, grid, k, pattern):
    policy, sigmas = _random_policy(), get_sigmas(grid, T)
    with pytest.raises(RecacheError, match=pattern) as e:
        policy.schedule(k, sigmas=sigmas)
    assert "trained on T 20, 50 with time-shifted grids of shift 1, 3" in str(e.value)
    assert "--allow-extrapolate" in str(e.value)
    assert "\n" not in str(e.value)
    assert policy.schedule(k, sigmas=sigmas, allow_extrapolate=True).k == k
    assert not policy.covers(k, sigmas)


def test_a_grid_of_another_family_is_refused():
    with pytest.raises(RecacheError, match="not a time-shifted one"):
        _random_policy().schedule(8, sigmas=torch.linspace(1, 0, 31) ** 3)


def test_guard_is_per_setting_and_says_where_it_was_not_checked():
    config = NoiseLevelConfig(**{**TRAINED.__dict__, "fallback": [{"T": 20, "shift": 1.0, "k": 5}]})
    policy = _random_policy(config)
    fell_back = policy.schedule(5, sigmas=get_sigmas("linear", 20))
    assert fell_back.mask == Schedule.uniform(20, 5).mask
    assert (fell_back.metadata["fallback"], fell_back.metadata["guard"]) == ("uniform", "uniform")
    assert policy.schedule(5, sigmas=get_sigmas("linear", 20), guarded=False).metadata["guard"] == "uniform"
    assert policy.schedule(6, sigmas=get_sigmas("linear", 20)).metadata["guard"] == "learned"
    unchecked = policy.schedule(5, sigmas=get_sigmas("shifted:3", 20), allow_extrapolate=True)
    assert unchecked.metadata["guard"] == "not checked"
    assert policy.schedule(12, sigmas=get_sigmas("shifted", 50)).metadata["sigmas"] == "shifted:3"


def test_v2_round_trip_and_old_policies_still_load(tmp_path):
    policy = _random_policy()
    policy.save_pretrained(tmp_path / "v2")
    loaded = load_policy(tmp_path / "v2")
    sigmas = get_sigmas("shifted", 50)
    assert isinstance(loaded, NoiseLevelPolicy)
    assert loaded.schedule(12, sigmas=sigmas) == policy.schedule(12, sigmas=sigmas)
    old = load_policy(Path(__file__).parent / "fixtures" / "policy-v1-taylorseer")
    assert isinstance(old, ReCachePolicy) and old.schedule(10, sigmas=get_sigmas("linear", 50)).k == 10
    with pytest.raises(RecacheError, match="trained on the 'linear' sigma grid"):  # v1: one grid, now checked
        old.schedule(10, sigmas=get_sigmas("shifted", 50))
    with pytest.raises(RecacheError, match="trained for mechanism = taylorseer, not hicache"):
        load_policy(tmp_path / "v2", mechanism="hicache")


@pytest.mark.parametrize("damage, pattern", [
    (lambda c: c.update(settings=[{"T": 1, "shift": 1.0}]), "settings must list"),
    (lambda c: c.update(k_fraction=[0.5, 0.1]), "k_fraction"),
    (lambda c: c.pop("settings"), "not a valid ReCache v2 policy config"),
    (lambda c: c.update(fallback=[{"T": 20}]), "fallback"),
])
def test_a_damaged_v2_folder_is_one_line_and_nothing_is_written(tmp_path, damage, pattern):
    _random_policy().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    damage(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RecacheError, match=pattern):
        load_policy(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_relocations_move_one_computed_step_and_never_step_0():
    steps = (0, 5, 9, 14)
    moved = relocations(steps, 20, 12, 3, torch.Generator().manual_seed(0))
    assert len(moved) == len(set(moved)) == 12
    for m in moved:
        assert m[0] == 0 and len(m) == 4 and len(set(m) - set(steps)) == 1 and max(m) < 20


@pytest.fixture(scope="module")
def pipe():
    return DigitPipeline.from_pretrained("mnist-dit")


def _weights(folder):
    return load_file(folder / "policy" / "model.safetensors")


def _log(folder):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in read_jsonl(folder / "train_log.jsonl")]


def test_expert_training_is_deterministic_guarded_and_resumes_bit_for_bit(pipe, tmp_path, interrupt_at_checkpoint):
    policy = train_noise_level(SHORT, tmp_path / "a", pipe, progress=False)
    interrupt_at_checkpoint(expert_training, 2)
    with pytest.raises(KeyboardInterrupt):
        train_noise_level(SHORT, tmp_path / "b", pipe, progress=False)
    with pytest.raises(RecacheError, match="already holds a training run"):
        train_noise_level(SHORT, tmp_path / "b", pipe, progress=False)
    train_noise_level(SHORT, tmp_path / "b", pipe, resume=True, progress=False)
    assert _log(tmp_path / "a") == _log(tmp_path / "b") and [r["round"] for r in _log(tmp_path / "a")] == [0, 1, 2]
    for name, value in _weights(tmp_path / "a").items():
        assert torch.equal(value, _weights(tmp_path / "b")[name]), name
    guard = json.loads((tmp_path / "a" / "guard.json").read_text())
    assert {(g["T"], g["shift"]) for g in guard["settings"]} == {(6, 1.0), (6, 3.0), (8, 1.0), (8, 3.0)}
    assert policy.config.fallback == [{k: g[k] for k in ("T", "shift", "k")} for g in guard["settings"]
                                      if g["fallback"]]
    assert policy.config.training["rollouts"] > 0 and policy.config.training["trainer"] == "expert-iteration"
    for T, grid in ((6, "linear"), (8, "shifted"), (7, "shifted:2")):  # trained, and one between the trained ones
        for k in policy.config.budgets(T):
            assert policy.schedule(k, sigmas=get_sigmas(grid, T), allow_extrapolate=T == 7).k == k
    other = ExpertConfig(**{**SHORT.__dict__, "lr": 0.5})
    with pytest.raises(RecacheError, match="other settings"):
        train_noise_level(other, tmp_path / "a", pipe, resume=True, progress=False)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"steps": (3,)}, "step counts"), ({"shifts": (0.0,)}, "shifts"), ({"samples": 0, "neighbours": 0}, "proposals"),
    ({"k_fraction": (0.5, 0.2)}, "k_fraction"), ({"rounds": 0}, "rounds"),
])
def test_bad_expert_settings(kwargs, pattern):
    with pytest.raises(RecacheError, match=pattern):
        ExpertConfig(**kwargs)
