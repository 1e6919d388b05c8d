import json
import math
import signal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recache.errors import RecacheError
from recache.evaluation.compare import heuristic_methods
from recache.policies.heuristics import HEURISTICS, OnlineHeuristic, get_heuristic
from recache.policies.heuristics.base import relative_l1
from recache.policies.heuristics.calibrate import Calibration, calibrate, realised_passes
from recache.policies.heuristics.fixed_interval import FixedInterval
from recache.policies.heuristics.magcache import MagCache, magnitude_ratios
from recache.policies.heuristics.teacache import TeaCache
from recache.protocol import calibration_pairs
from recache.sampling.pipeline import DigitPipeline
from recache.sampling.sigmas import get_sigmas

ONLINE = [name for name, cls in HEURISTICS.items() if issubclass(cls, OnlineHeuristic)]


@pytest.fixture
def tiny_pipe(tiny_dit) -> DigitPipeline:
    return DigitPipeline(tiny_dit, get_sigmas("linear", 12), guidance=2.0, model_id="tiny")


@pytest.fixture(scope="module")
def pipe() -> DigitPipeline:
    return DigitPipeline.from_pretrained("mnist-dit")


def test_relative_l1_is_per_sample_over_both_branches():
    a, b = torch.zeros(4, 3), torch.ones(4, 3)  # rows: cond 0, cond 1, uncond 0, uncond 1
    a[0] = 1.0  # sample 0 matches b on its conditional row only
    assert torch.allclose(relative_l1(a, b, branches=2), torch.tensor([0.5, 1.0]))
    assert torch.allclose(relative_l1(a, b, branches=1), torch.tensor([0.0, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("name", ONLINE)
def test_threshold_zero_is_the_uncached_sampler(tiny_pipe, name):
    classes, seeds = torch.tensor([1, 2, 3]), [5, 6, 7]
    reference = tiny_pipe(classes, seeds)
    images, masks = tiny_pipe.sample_online(get_heuristic(name, 0.0), classes, seeds)
    assert masks.all()
    assert torch.allclose(images, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, forced", [("teacache", 2), ("first-block-cache", 1), ("dicache", 2)])
def test_a_huge_threshold_computes_only_the_forced_steps(tiny_pipe, name, forced):
    _, masks = tiny_pipe.sample_online(get_heuristic(name, 1e9), torch.tensor([1, 2]), [5, 6])
    assert masks.sum(1).tolist() == [forced, forced]
    assert masks[:, 0].all()


@pytest.mark.parametrize("name", ONLINE)
def test_realised_passes_are_the_steps_where_the_last_block_ran(pipe, name):
    """Count rows through the last block with a hook: it runs exactly on the computed steps of each sample (x2 for
    CFG)."""
    calibration = calibrate(name, 10, pipe, *calibration_pairs(4), iterations=6, progress=False)
    rows_seen = []
    hook = pipe.model.blocks[-1].register_forward_hook(lambda m, args, out: rows_seen.append(out.shape[0]))
    try:
        _, masks = pipe.sample_online(calibration.build(), torch.tensor([3, 8]), [900_000, 900_001])
    finally:
        hook.remove()
    assert sum(rows_seen) == 2 * int(masks.sum())
    assert 2 < masks.sum(1).min() < pipe.steps  # the calibrated threshold really skips


@pytest.mark.parametrize("name, threshold", [("teacache", 0.05), ("first-block-cache", 0.2), ("dicache", 0.002)])
def test_a_sample_does_not_depend_on_its_batch(tiny_pipe, name, threshold):
    assert set(ONLINE) == {"teacache", "first-block-cache", "dicache"}
    heuristic = get_heuristic(name, threshold)
    alone, alone_mask = tiny_pipe.sample_online(heuristic, torch.tensor([4]), [11])
    both, both_masks = tiny_pipe.sample_online(heuristic, torch.tensor([4, 9]), [11, 12])
    assert not alone_mask.all()  # steps really skipped ...
    assert not torch.equal(both_masks[0], both_masks[1])  # ... and at different steps for the two samples of the batch
    assert torch.equal(alone_mask[0], both_masks[0])
    assert torch.allclose(alone[0], both[0], atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 80), interval=st.integers(1, 80))
def test_fixed_interval_computes_ceil_T_over_N_steps(T, interval):
    schedule = FixedInterval(interval).schedule(T)
    assert schedule.k == math.ceil(T / interval)
    assert schedule.steps == list(range(0, T, interval))


def test_magcache_decisions_follow_the_accumulated_drift():
    flat = MagCache(0.5, ratios=[1.0] * 50, max_skip=4, retention=0.0)  # no drift: only the skip cap forces computes
    assert flat.schedule(50).steps == list(range(0, 50, 5))
    drifting = MagCache(0.0, ratios=[1.0] + [0.9] * 49, retention=0.0)  # any drift above a zero threshold computes
    assert drifting.schedule(50).k == 50
    kept = MagCache(1e9, ratios=[1.0] * 50, max_skip=100, retention=0.2)  # retention prefix always computes
    assert kept.schedule(50).steps == list(range(10))


def test_magnitude_ratios_are_measured_on_the_model(tiny_pipe):
    ratios = magnitude_ratios(tiny_pipe, torch.tensor([1, 2]), [3, 4])
    assert len(ratios) == tiny_pipe.steps and ratios[0] == 1.0
    assert all(math.isfinite(r) and r > 0 for r in ratios) and len(set(ratios)) > 2


def test_teacache_fits_a_polynomial_on_the_model(tiny_pipe):
    options = TeaCache.fit(tiny_pipe, torch.tensor([1, 2]), [3, 4], {})
    assert len(options["coefficients"]) == 5 and options["coefficients"] != [0.0, 0.0, 0.0, 1.0, 0.0]
    assert TeaCache.fit(tiny_pipe, torch.tensor([1]), [3],
                        {"coefficients": [1, 2, 3, 4, 5]})["coefficients"] == [1, 2, 3, 4, 5]


def test_calibration_reaches_the_budget_and_round_trips(pipe, tmp_path):
    classes, seeds = calibration_pairs(8)
    calibration = calibrate("teacache", 10, pipe, classes, seeds, progress=False)
    assert calibration.reachable and abs(calibration.mean_k - 10) <= 0.5
    assert abs(float(realised_passes(calibration.build(), pipe, classes, seeds).float().mean())
               - calibration.mean_k) < 1e-9
    calibration.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json", T=50, model="mnist-dit") == calibration


def test_bisection_stops_when_midpoints_repeat(pipe):
    """k = 5 is out of MagCache's reach (retention prefix): bisection closes in on one float, where midpoints repeat;
    it must still stop after ``iterations``, not spin."""
    def stuck(signum, frame):
        raise TimeoutError("calibration did not stop")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(30)
    try:
        calibration = calibrate("magcache", 5, pipe, *calibration_pairs(2), {"ratios": [1.0] + [0.99] * 49},
                                iterations=500, progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not calibration.reachable and calibration.mean_k == 9


def test_a_saved_calibration_is_reused_only_when_everything_matches(tiny_dit, tmp_path):
    """A calibration saved for another guidance, T or number of pairs (or in an older format) is redone and
    overwritten, neither reused nor an error. The marker: a saved interval of 5 instead of the calibrated 3."""
    def run(pipe, pairs=2):
        (method,) = heuristic_methods(["fixed-interval"], [4], pipe, ["reuse"], tmp_path, pairs=pairs,
                                      progress=False)[0]
        return method.schedule.steps

    def mark(**changes):
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "threshold": 5.0, **changes}))

    path = tmp_path / "fixed-interval-k4.json"
    pipe = DigitPipeline(tiny_dit, get_sigmas("linear", 12), guidance=2.0, model_id="tiny")
    assert run(pipe) == [0, 3, 6, 9]
    mark()
    assert run(pipe) == [0, 5, 10]  # everything matches: reused
    assert run(DigitPipeline(tiny_dit, get_sigmas("linear", 12), guidance=3.0, model_id="tiny")) == [0, 3, 6, 9]
    assert json.loads(path.read_text())["guidance"] == 3.0
    mark()
    assert run(DigitPipeline(tiny_dit, get_sigmas("linear", 16), guidance=3.0, model_id="tiny")) == [0, 4, 8, 12]
    assert json.loads(path.read_text())["T"] == 16
    mark()
    assert run(DigitPipeline(tiny_dit, get_sigmas("linear", 16), guidance=3.0, model_id="tiny"),
               pairs=3) == [0, 4, 8, 12]
    mark(format="recache.heuristic/v1")
    assert run(DigitPipeline(tiny_dit, get_sigmas("linear", 16), guidance=3.0, model_id="tiny"),
               pairs=3) == [0, 4, 8, 12]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # overwritten in place, no temporary file left


def test_calibration_records_what_it_depends_on(tiny_pipe):
    calibration = calibrate("dicache", 6, tiny_pipe, *calibration_pairs(2), iterations=4, progress=False)
    assert ((calibration.model, calibration.T, calibration.guidance, calibration.sigmas, calibration.pairs)
            == ("tiny", 12, 2.0, "linear", 2))
    assert calibration.settings == {"probe_depth": 1, "mode": "delta_minus", "retention": 0.0}
    assert calibration.matches("dicache", 6, tiny_pipe, 2)
    assert not calibration.matches("dicache", 6, tiny_pipe, 2, {"mode": "delta_y"})
    assert not calibration.matches("dicache", 7, tiny_pipe, 2)


def test_unreachable_budgets_report_the_closest(pipe):
    classes, seeds = calibration_pairs(2)
    fixed = calibrate("fixed-interval", 14, pipe, classes, seeds, progress=False)
    assert not fixed.reachable and fixed.mean_k == 13 and fixed.threshold == 4  # N = 4 -> 13, N = 3 -> 17
    mag = calibrate("magcache", 5, pipe, classes, seeds, progress=False)  # the retention prefix alone is 5 steps
    assert not mag.reachable and mag.mean_k > 5.5


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d.update(format="recache.heuristic/v1"), r"is not a recache.heuristic/v2 file"),
    (lambda d: d.update(threshold=-1.0), r"threshold -1.0 is not allowed"),
    (lambda d: d.update(threshold=float("nan")), r"threshold nan is not allowed"),
    (lambda d: d.update(heuristic="fastcache"), r"unknown heuristic 'fastcache'"),
    (lambda d: d.update(surprise=1), r"missing or unknown fields"),
    (lambda d: d.pop("target_k"), r"missing or unknown fields"),
    (lambda d: d.pop("guidance"), r"missing or unknown fields"),
    (lambda d: d.update(T=20), r"is for T=20 steps, but this run has T=50"),
    (lambda d: d.update(model="flux"), r"was made for model 'flux'"),
    (lambda d: d["options"].update(mode="delta_z"), r"dicache mode 'delta_z' is not allowed"),
    (lambda d: d["options"].update(probe_depth=0), r"probe_depth 0 is not allowed"),
])
def test_bad_calibration_files(tmp_path, edit, pattern):
    data = {"format": "recache.heuristic/v2", "heuristic": "dicache", "threshold": 0.1,
            "options": {"probe_depth": 1, "mode": "delta_minus", "retention": 0.0},
            "target_k": 10, "mean_k": 10.0, "pairs": 32, "model": "mnist-dit", "T": 50, "guidance": 4.0,
            "sigmas": "linear", "settings": {"probe_depth": 1, "mode": "delta_minus", "retention": 0.0}}
    edit(data)
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(RecacheError, match=pattern):
        Calibration.load(tmp_path / "c.json", T=50, model="mnist-dit")


def test_truncated_calibration_file(tmp_path):
    (tmp_path / "c.json").write_text('{"format": "recache.heur')
    with pytest.raises(RecacheError, match="cannot be read as JSON"):
        Calibration.load(tmp_path / "c.json")


def test_teacache_needs_a_feature_mechanism():
    with pytest.raises(RecacheError, match="feature mechanism, not 'step-skip'"):
        TeaCache(0.1, mechanism="step-skip")
