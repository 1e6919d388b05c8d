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
from recache.mechanisms import get_mechanism
from recache.policies import NoiseLevelConfig, NoiseLevelPolicy, ReCachePolicy, expert_training, load_policy
from recache.policies.budcache import rollout_objective
from recache.policies.expert_iteration import ExpertConfig, best_per_budget, proposals, relocations, transferred
from recache.policies.expert_training import train_noise_level
from recache.protocol import calibration_pairs
from recache.sampling.pipeline import DigitPipeline
from recache.sampling.sigmas import fit_shift, get_sigmas
from recache.schedule import Schedule

TRAINED = NoiseLevelConfig(settings=[{"T": 20, "shift": 1.0}, {"T": 50, "shift": 3.0}], k_fraction=[0.1, 0.5])
SHORT = ExpertConfig(steps=(6, 8), shifts=(1.0, 3.0), k_fraction=(0.25, 0.5), rounds=3, budgets_per_round=3,
                     samples=2, neighbours=3, pairs=2, screen_pairs=1, promote=2, distil_steps=3, final_steps=6,
                     hidden=16, seed=3)


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
    (40, "linear", 8, "T=40 with a grid of shift 1 is outside"),  # (50, linear) around it was not trained
    (10, "shifted:2", 3, "T=10 is outside"),
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


PRODUCT = NoiseLevelConfig(settings=[{"T": T, "shift": x} for T in (20, 50) for x in (1.0, 3.0)],
                           k_fraction=[0.1, 0.5],
                           guard_ratios=[{"T": T, "shift": x, "k": k, "ratio": 0.5} for T in (20, 50)
                                         for x in (1.0, 3.0) for k in range(2, 26)])


@settings(max_examples=40, deadline=None)
@given(T=st.integers(20, 50), shift=st.floats(1.0, 3.0), data=st.data())
def test_between_trained_settings_the_schedule_is_interpolated_with_exact_k(T, shift, data):
    policy = _random_policy(PRODUCT)
    k = data.draw(st.sampled_from(list(PRODUCT.budgets(T))))
    schedule = policy.schedule(k, sigmas=get_sigmas(f"shifted:{shift}", T))
    assert (schedule.T, schedule.k, schedule.mask[0]) == (T, k, True)
    trained = T in (20, 50) and any(abs(shift - x) <= 1e-3 * x for x in (1.0, 3.0))
    allowed = {"learned"} if trained else {"interpolated", "uniform"}  # uniform: k outside a neighbour's range
    assert schedule.metadata["guard"] in allowed


def test_a_schedule_between_trained_settings_follows_their_noise_levels_and_their_guard():
    policy = _random_policy(PRODUCT)
    lo, hi = (policy.schedule(8, sigmas=get_sigmas(g, 50)) for g in ("linear", "shifted:3"))
    between = policy.schedule(8, sigmas=get_sigmas("shifted:1.0005", 50))  # within SHIFT_MATCH of linear: trained
    assert between == lo and between.metadata["guard"] == "learned"
    near = policy.schedule(8, sigmas=get_sigmas("shifted:2.99", 50))  # interpolated, 99 % from shift 3
    assert near.metadata["guard"] == "interpolated" and near.steps == hi.steps
    assert policy.schedule(12, sigmas=get_sigmas("shifted:2", 30)).metadata["guard"] == "uniform"  # T=20: k <= 10
    ratios = [{**r, "ratio": 0.9} if (r["T"], r["shift"], r["k"]) == (50, 3.0, 8) else r for r in PRODUCT.guard_ratios]
    doubtful = _random_policy(NoiseLevelConfig(**{**PRODUCT.__dict__, "guard_ratios": ratios}))
    kept = doubtful.schedule(8, sigmas=get_sigmas("shifted:2", 50))
    assert (kept.mask, kept.metadata["fallback"], kept.metadata["guard"]) == (Schedule.uniform(50, 8).mask, "uniform",
                                                                                "uniform")
    assert doubtful.schedule(8, sigmas=get_sigmas("shifted:2", 50), guarded=False).metadata["guard"] == "interpolated"
    assert doubtful.schedule(9, sigmas=get_sigmas("shifted:2", 50)).metadata["guard"] == "interpolated"
    for k, guard in ((20, "interpolated"), (21, "uniform")):  # above TRANSFER_FRACTION = 0.4 of T, uniform is kept
        assert policy.schedule(k, sigmas=get_sigmas("shifted:2", 50)).metadata["guard"] == guard


def test_eval_notes_say_where_a_schedule_was_interpolated_kept_uniform_or_not_checked():
    from recache.cli.evaluate import guard_notes

    policy = _random_policy(PRODUCT)
    schedules = [policy.schedule(k, sigmas=get_sigmas("shifted:2", 30)) for k in (5, 12)]
    schedules.append(policy.schedule(6, sigmas=get_sigmas("linear", 60), allow_extrapolate=True))
    notes = guard_notes("p", schedules)
    assert [n.split(" (")[0].split(" on ")[0] for n in notes] == [
        "policy p: uniform schedule kept at k = [12]", "policy p: k = [5]", "policy p: k = [6]"]
    assert "interpolated from the trained settings" in notes[1] and "outside the trained range" in notes[2]


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
    config = json.loads((tmp_path / "v2" / "config.json").read_text())
    del config["guard_ratios"]  # a v2 policy saved before the guard's ratios were kept
    (tmp_path / "v2" / "config.json").write_text(json.dumps(config))
    assert load_policy(tmp_path / "v2").schedule(12, sigmas=sigmas) == policy.schedule(12, sigmas=sigmas)
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
    (lambda c: c.update(guard_ratios=[{"T": 20, "shift": 1.0, "k": 4, "ratio": "low"}]), "guard_ratios"),
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
    doubled = relocations(steps, 20, 12, 3, torch.Generator().manual_seed(0), moves=2)
    assert all(m[0] == 0 and len(m) == 4 and 1 <= len(set(m) - set(steps)) <= 2 for m in doubled)
    assert sum(len(set(m) - set(steps)) == 2 for m in doubled) >= 3  # the second move may take the same step


def test_transfers_place_the_other_settings_elites_by_noise_level_with_the_same_k():
    grids = [get_sigmas("linear", 50), get_sigmas("shifted:3", 50), get_sigmas("linear", 20)]
    elites = {(0, 6): (0.1, (0, 1, 2, 4, 9, 30)), (2, 6): (0.2, (0, 1, 2, 3, 5, 12)), (2, 7): (0.3, tuple(range(7)))}
    moved = transferred(grids, 6, elites, setting=1)
    assert len(moved) == 2 and all(len(m) == 6 and m[0] == 0 and list(m) == sorted(set(m)) for m in moved)
    for steps, (other, _) in zip(moved, [(0, 6), (2, 6)], strict=True):
        source = grids[other][list(elites[other, 6][1])]
        gaps = (grids[1][list(steps)] - source).abs()[1:]  # each the nearest step of shift 3's grid
        spacing = (grids[1][:-1] - grids[1][1:]).max()
        assert torch.all(gaps <= spacing), (steps, gaps)
    (wider,) = transferred(grids, 7, elites, setting=0)  # T = 20 to 50: a step of 20 is 2.5 of 50
    assert all(u in (5 * j // 2, (5 * j + 1) // 2) for j, u in enumerate(wider)), wider


def test_delta_searches_longer_without_transfers_and_the_flag_removes_them_from_the_proposals():
    assert (ExpertConfig(mechanism="delta").rounds, ExpertConfig(mechanism="delta").transfers) == (60, False)
    assert (ExpertConfig(mechanism="hicache").rounds, ExpertConfig(mechanism="hicache").transfers) == (90, True)
    assert ExpertConfig(mechanism="delta", rounds=5, transfers=True).transfers is True  # explicit settings win
    grids = [get_sigmas("linear", 20), get_sigmas("shifted:3", 20)]
    elites = {(1, 5): (0.1, (0, 1, 2, 3, 4))}  # an elite that only a transfer proposes on setting 0
    elites[0, 5] = (0.2, (0, 4, 8, 12, 16))
    policy = _random_policy(NoiseLevelConfig(settings=[{"T": 20, "shift": 1.0}, {"T": 20, "shift": 3.0}],
                                             k_fraction=[0.1, 0.5]))
    (moved,) = transferred(grids, 5, elites, setting=0)
    for transfers in (True, False):
        config = ExpertConfig(mechanism="delta", transfers=transfers, samples=0, neighbours=4)
        drawn = proposals(policy, grids, 5, elites, 0, set(), config, torch.Generator().manual_seed(0))
        assert (moved in drawn) is transfers, (transfers, moved, drawn)


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
    assert [r["ratio"] for r in policy.config.guard_ratios] == pytest.approx(
        [g["learned_loss"] / g["uniform_loss"] for g in guard["settings"]], rel=1e-5)
    assert policy.config.training["rollouts"] > 0 and policy.config.training["trainer"] == "expert-iteration"
    for T, grid in ((6, "linear"), (8, "shifted"), (7, "shifted:2")):  # trained, and one between the trained ones
        for k in policy.config.budgets(T):
            assert policy.schedule(k, sigmas=get_sigmas(grid, T)).k == k
    other = ExpertConfig(**{**SHORT.__dict__, "lr": 0.5})
    with pytest.raises(RecacheError, match="other settings"):
        train_noise_level(other, tmp_path / "a", pipe, resume=True, progress=False)


def test_screening_adds_up_to_the_objective_on_all_pairs_and_promotes_the_best_of_each_budget(pipe):
    grid = DigitPipeline(pipe.model, get_sigmas("linear", 8), pipe.guidance, pipe.model_id, "linear")
    classes, seeds = calibration_pairs(3)
    mechanism, schedules = get_mechanism("taylorseer"), [(0, 3, 6), (0, 1, 2), (0, 2, 4, 6)]
    full = rollout_objective(grid, mechanism, classes, seeds, grid(classes, seeds))(schedules)
    split = expert_training._objective(grid, mechanism, classes, seeds, screen_pairs=1)
    assert split(schedules) == pytest.approx(full, rel=1e-5) and split.share == pytest.approx(1 / 3)
    assert split.head(schedules) != pytest.approx(full, rel=1e-3)  # one pair is not all three
    items = [(3, (0, 1, 2)), (3, (0, 1, 3)), (3, (0, 1, 4)), (4, (0, 1, 2, 3)), (4, (0, 1, 2, 4))]
    assert best_per_budget(items, [0.3, 0.1, 0.2, 0.5, 0.4], 2) == [1, 2, 3, 4]


@pytest.mark.parametrize("kwargs, pattern", [
    ({"steps": (3,)}, "step counts"), ({"shifts": (0.0,)}, "shifts"), ({"samples": 0, "neighbours": 0}, "proposals"),
    ({"k_fraction": (0.5, 0.2)}, "k_fraction"), ({"rounds": 0}, "rounds"), ({"screen_pairs": 8}, "screen_pairs"),
    ({"screen_pairs": 2, "promote": 0}, "promote"),
])
def test_bad_expert_settings(kwargs, pattern):
    with pytest.raises(RecacheError, match=pattern):
        ExpertConfig(**kwargs)
