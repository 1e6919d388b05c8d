import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recache.cli import main
from recache.errors import RecacheError
from recache.mechanisms import get_mechanism
from recache.policies.alignment import AlignConfig, MonotoneSigmas, align_sigmas
from recache.sampling.cached import sample_cached
from recache.sampling.pipeline import DigitPipeline
from recache.sampling.sigmas import get_sigmas
from recache.schedule import Schedule


@pytest.fixture(scope="module")
def pipe():
    return DigitPipeline.from_pretrained("mnist-dit", steps=10)


def test_monotone_sigmas_start_at_the_base_grid():
    for name in ("linear", "shifted"):
        base = get_sigmas(name, 20)
        torch.testing.assert_close(MonotoneSigmas(base)(), base, atol=1e-6, rtol=0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=12, max_size=12))
def test_any_parameters_give_a_monotone_grid_with_fixed_ends(theta):
    base = get_sigmas("linear", 12)
    grid = MonotoneSigmas(base)
    with torch.no_grad():
        grid.theta.copy_(torch.tensor(theta))
    sigmas = grid()
    assert sigmas[0] == base[0] and sigmas[-1] == base[-1]
    assert (sigmas[1:] <= sigmas[:-1] + 1e-6).all()


def test_gradients_reach_the_sigmas_through_the_cached_sampler(pipe):
    grid = MonotoneSigmas(pipe.sigmas)
    masks = Schedule.from_steps(10, [0, 4, 8]).as_tensor()[None]
    pipe.model.requires_grad_(False)
    try:
        out, passes = sample_cached(pipe.model, pipe.noise([0]), grid(), torch.tensor([3]), masks,
                                    get_mechanism("taylorseer"), pipe.guidance)
        out.square().mean().backward()
    finally:
        pipe.model.requires_grad_(True)
    assert passes.tolist() == [3]
    assert grid.theta.grad is not None and grid.theta.grad.abs().sum() > 0


def test_alignment_lowers_the_calibration_loss_and_is_used_by_the_pipeline(pipe, tmp_path):
    schedule = Schedule.from_steps(10, [0, 3, 7], model="mnist-dit")
    aligned, log = align_sigmas(schedule, pipe, "taylorseer", AlignConfig(updates=4, pairs=2), progress=False)
    assert len(log) == 5 and aligned.metadata["align_loss"] <= aligned.metadata["base_loss"] == log[0]["loss"]
    assert aligned.metadata["align_loss"] == min(r["loss"] for r in log)
    assert all(p.requires_grad for p in pipe.model.parameters())  # the model is unfrozen afterwards
    if "aligned_sigmas" in aligned.metadata:
        aligned.save(tmp_path / "a.json")
        loaded = Schedule.load(tmp_path / "a.json", T=10)
        torch.testing.assert_close(pipe.sigmas_for([loaded]), torch.tensor(aligned.metadata["aligned_sigmas"]))
        out, passes = pipe.sample_with(loaded, "taylorseer", [1], [0])
        assert passes.tolist() == [3]
        base, _ = pipe.sample_with(schedule, "taylorseer", [1], [0])
        assert not torch.equal(out, base)


def test_sigma_grid_errors(pipe):
    plain = Schedule.from_steps(10, [0, 5])
    with pytest.raises(RecacheError, match="must share their sigma grid"):
        pipe.sigmas_for([plain, plain.with_metadata(aligned_sigmas=pipe.sigmas.tolist())])
    with pytest.raises(RecacheError, match="11 non-increasing values, got 3"):
        pipe.sigmas_for([plain.with_metadata(aligned_sigmas=[1.0, 0.5, 0.0])])
    with pytest.raises(RecacheError, match="alignment needs updates >= 1"):
        AlignConfig(updates=0)


def test_align_command_line(capsys, tmp_path):
    other = tmp_path / "t20.json"
    Schedule.uniform(20, 4).save(other)
    assert main(["align", "--schedule", str(other), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is for T=20 steps, but this run has T=50" in err[0]
    assert not (tmp_path / "x.json").exists()
    good = tmp_path / "s.json"
    Schedule.from_steps(10, [0, 2, 6], model="mnist-dit").save(good)
    assert main(["align", "--schedule", str(good), "--steps", "10", "--updates", "2", "--pairs", "1"]) == 0
    assert (tmp_path / "s-aligned.json").is_file() and (tmp_path / "s-aligned.png").is_file()
    assert "MSE to uncached on 1 calibration pairs" in capsys.readouterr().out
