import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recache.cli import main
from recache.errors import RecacheError
from recache.policies.budcache import BudCacheSearch, SearchConfig, search_schedule
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule

TARGET = (0, 1, 7, 12, 20, 28)


def _objective(calls):
    """A synthetic loss: distance of the computed steps to ``TARGET`` (minimum 0 at TARGET)."""
    def evaluate(candidates):
        calls.append(list(candidates))
        return [float(sum(abs(a - b) for a, b in zip(c, TARGET, strict=True))) for c in candidates]
    return evaluate


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 12), st.integers(0, 1000))
def test_every_candidate_keeps_the_budget_and_the_prefix(k, seed):
    config = SearchConfig(k=k, sa_iters=30, hc_iters=3, seed=seed)
    seen = []

    def evaluate(candidates):
        seen.extend(candidates)
        return [float(sum(c)) for c in candidates]

    search = BudCacheSearch(30, config, evaluate, progress=False)
    best = search.run()
    assert all(len(c) == k and len(set(c)) == k and set(range(config.prefix)) <= set(c) and max(c) < 30 for c in seen)
    assert len(seen) == len(set(seen)) == len(search.memo)  # each schedule evaluated once
    assert search.memo[best] == min(search.memo.values())


def test_search_finds_the_optimum_of_a_simple_objective_and_is_deterministic():
    config = SearchConfig(k=6, sa_iters=200, hc_iters=30, seed=3)
    calls = []
    a = BudCacheSearch(30, config, _objective(calls), progress=False)
    assert a.run() == TARGET and a.best[0] == 0.0
    b = BudCacheSearch(30, config, _objective([]), progress=False)
    assert b.run() == TARGET and [r["steps"] for r in b.history] == [r["steps"] for r in a.history]
    assert a.history[0]["phase"] == "init"  # the initial state is scored
    assert {r["phase"] for r in a.history} == {"init", "anneal", "climb"}


def test_a_prefilled_memo_replays_the_search_without_evaluating():
    config = SearchConfig(k=6, sa_iters=50, hc_iters=5, seed=1)
    first = BudCacheSearch(30, config, _objective([]), progress=False)
    best = first.run()
    calls = []
    again = BudCacheSearch(30, config, _objective(calls), memo=first.memo, progress=False)
    assert again.run() == best and calls == []


def test_hill_climbing_alone_stops_at_a_local_minimum():
    calls = []
    search = BudCacheSearch(30, SearchConfig(k=6, sa_iters=0, hc_iters=50, seed=0), _objective(calls), progress=False)
    best = search.run()
    assert search.memo[best] == min(search.memo.values())
    neighbours = search.neighbours(best)
    assert all(search.memo.get(n, float("inf")) >= search.memo[best] for n in neighbours)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"k": 5, "sa_iters": 0, "hc_iters": 0}, "need some iterations"), ({"k": 5, "pairs": 0}, "pairs must be >= 1"),
    ({"k": 5, "t_min": 0.0}, "temperatures"), ({"k": 5, "restarts": 0}, "restarts must be >= 1"),
])
def test_bad_search_settings(kwargs, pattern):
    with pytest.raises(RecacheError, match=pattern):
        SearchConfig(**kwargs)


@pytest.mark.parametrize("k, pattern", [(30, "equals T: every step is computed"), (31, "budget k=31 is not allowed"),
                                        (0, "budget k=0")])
def test_budgets_that_leave_nothing_to_search(k, pattern):
    with pytest.raises(RecacheError, match=pattern):
        BudCacheSearch(30, SearchConfig(k=k), _objective([]))


def test_search_on_the_embedded_model_writes_a_usable_schedule_and_resumes(tmp_path, capsys):
    pipe = DigitPipeline.from_pretrained("mnist-dit", steps=10)
    config = SearchConfig(k=4, pairs=2, sa_iters=8, hc_iters=2)
    schedule, history = search_schedule(config, pipe, tmp_path, progress=False)
    assert (schedule.k == 4 and schedule.metadata["source"] == "budcache"
            and schedule.metadata["mechanism"] == "taylorseer")
    assert schedule.metadata["search_loss"] == min(r["loss"] for r in history)
    saved = Schedule.load(tmp_path / "schedule.json", T=10, model="mnist-dit")
    assert saved.mask == schedule.mask
    lines = (tmp_path / "memo.jsonl").read_text().splitlines()
    assert len(lines) == schedule.metadata["evaluations"]
    assert schedule.metadata["uniform_loss"] > 0
    with pytest.raises(RecacheError, match="already holds a search"):
        search_schedule(config, pipe, tmp_path, progress=False)
    again, _ = search_schedule(config, pipe, tmp_path, resume=True, progress=False)
    assert again.mask == schedule.mask
    assert len((tmp_path / "memo.jsonl").read_text().splitlines()) == len(lines)  # no schedule evaluated twice
    assert main(["sample", "--schedule", str(tmp_path / "schedule.json"), "--steps", "10", "--mechanism", "taylorseer",
                 "--classes", "1", "--per-class", "1", "--out", str(tmp_path / "x.png")]) == 0
    assert "realised full passes per sample: 4 (taylorseer, budcache schedule" in capsys.readouterr().out
    assert json.loads((tmp_path / "history.jsonl").read_text().splitlines()[0])["phase"] == "init"


@pytest.mark.parametrize("argv, pattern", [
    (["search", "--budget", "0"], r"--budget: budget k=0 is not allowed: use a whole number of full passes >= 1"),
    (["search", "--budget", "5", "--sa-iters", "0", "--hc-iters", "0"], r"need some iterations"),
    (["search", "--budget", "5", "--pairs", "0"], r"--pairs: 0 is not a whole number >= 1"),
    (["search", "--budget", "50"], r"budget k=50 equals T"),
    (["search", "--budget", "60"], r"budget k=60 is not allowed"),
])
def test_search_command_line_errors(capsys, tmp_path, argv, pattern):
    code = None
    try:
        code = main([*argv, "--out", str(tmp_path / "s")])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert pattern.replace("\\", "") in err or __import__("re").search(pattern, err), err
    assert not (tmp_path / "s").exists()
