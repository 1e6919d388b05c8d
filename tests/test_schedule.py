import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recache.errors import RecacheError
from recache.schedule import Schedule, check_budget


@given(st.integers(1, 120).flatmap(lambda T: st.tuples(st.just(T), st.integers(1, T))))
def test_uniform_has_exactly_k_steps_and_starts_at_zero(Tk):
    T, k = Tk
    s = Schedule.uniform(T, k)
    assert s.T == T and s.k == k and s.mask[0]
    assert k == 1 or s.mask[-1]


def test_uniform_example():
    assert Schedule.uniform(50, 10).steps == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49]


@pytest.mark.parametrize("k", [0, -1, 51, 2.5, True])
def test_bad_budgets(k):
    with pytest.raises(RecacheError, match=f"budget k={k!r} is not allowed"):
        check_budget(k, 50)


def test_step_zero_must_compute():
    with pytest.raises(RecacheError, match="step 0 must be computed"):
        Schedule((False, True, True))
    with pytest.raises(RecacheError, match="at least one step"):
        Schedule(())


def test_json_round_trip_and_cache_dit(tmp_path):
    s = Schedule.from_steps(8, [0, 3, 5], model="mnist-dit", mechanism="reuse", sigmas="linear", source="search")
    s.save(tmp_path / "s.json")
    loaded = Schedule.load(tmp_path / "s.json", T=8, model="mnist-dit")
    assert loaded == s and loaded.metadata == s.metadata
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["T"] == 8 and data["k"] == 3 and data["mask"] == [1, 0, 0, 1, 0, 1, 0, 0]
    assert s.to_cache_dit()["steps_computation_mask"] == [1, 0, 0, 1, 0, 1, 0, 0]
    assert s.to_cache_dit()["steps_computation_policy"] == "static"


@pytest.mark.parametrize("text, pattern", [
    ("{nope", "not valid JSON"),
    ('{"mask": "1010"}', "needs a 'mask' list"),
    ('{"mask": [1, 2, 0]}', "must be 0 or 1"),
    ('{"mask": [1, 0.5]}', "must be 0 or 1"),
    ('{"mask": [0, 1]}', "step 0 must be computed"),
    ('{"mask": [1, 0, 1], "k": 3}', "k=3 but its mask has k=2"),
])
def test_malformed_files(tmp_path, text, pattern):
    (tmp_path / "s.json").write_text(text)
    with pytest.raises(RecacheError, match=pattern):
        Schedule.load(tmp_path / "s.json")


def test_file_for_another_run(tmp_path):
    Schedule.uniform(20, 5, model="other-model").save(tmp_path / "s.json")
    with pytest.raises(RecacheError, match="is for T=20 steps, but this run has T=50"):
        Schedule.load(tmp_path / "s.json", T=50)
    with pytest.raises(RecacheError, match="made for model 'other-model', not 'mnist-dit'"):
        Schedule.load(tmp_path / "s.json", T=20, model="mnist-dit")
    with pytest.raises(RecacheError, match="does not exist"):
        Schedule.load(tmp_path / "missing.json")
