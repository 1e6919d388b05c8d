"""Path planning: the dynamic programmes against brute force, exact budgets, the measured cost table (what an edge
means, resuming a stopped measurement) and the schedules the CLI writes."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from recache.cli import main
from recache.errors import RecacheError
from recache.mechanisms import get_mechanism
from recache.policies import cost_table
from recache.policies.budcache import rollout_objective
from recache.policies.path_planning import path_cost, plan_minimax, plan_schedules, plan_sum
from recache.protocol import calibration_pairs
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule


def random_costs(T: int, seed: int, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(T + 1, T + 1, generator=g, dtype=torch.float64)
    if ties:
        cost = (cost * 4).floor()  # few distinct values: many paths tie
    return torch.triu(cost, diagonal=1)


def brute_force(cost: torch.Tensor, k: int, key) -> tuple:
    T = cost.shape[0] - 1
    candidates = [(0, *rest) for rest in itertools.combinations(range(1, T), k - 1)]
    return min(key(cost, c) for c in candidates)


def leximax(cost, steps):
    nodes = [*steps, cost.shape[0] - 1]
    return tuple(sorted((float(cost[i, j]) for i, j in zip(nodes, nodes[1:], strict=False)), reverse=True))


@pytest.mark.parametrize("seed, ties", [(0, False), (1, False), (2, True), (3, True)])
def test_both_programmes_are_exact_against_brute_force_at_every_budget(seed, ties):
    T = 10
    cost = random_costs(T, seed, ties)
    sums, minimax = plan_sum(cost, T), plan_minimax(cost, T)
    for k in range(1, T + 1):
        for steps in (sums[k], minimax[k]):
            assert len(steps) == k and steps[0] == 0 and list(steps) == sorted(set(steps)) and steps[-1] < T
        assert path_cost(cost, sums[k]) == pytest.approx(brute_force(cost, k, path_cost), abs=1e-12)
        assert leximax(cost, minimax[k]) == brute_force(cost, k, leximax)


def test_schedules_carry_their_budget_plan_and_settings():
    cost = random_costs(50, 4)
    schedules = plan_schedules(cost, [4, 10, 25], "minimax", model="m", mechanism="taylorseer")
    for k, schedule in schedules.items():
        assert (schedule.T, schedule.k, schedule.mask[0]) == (50, k, True)
        assert schedule.metadata["source"] == "path" and schedule.metadata["objective"] == "minimax"
        assert schedule.metadata["planned_cost"] == path_cost(cost, schedule.steps, "minimax")
        assert Schedule.from_dict(schedule.to_dict()).steps == schedule.steps
    with pytest.raises(RecacheError, match="budget k=51 is not allowed"):
        plan_schedules(cost, [51])
    with pytest.raises(RecacheError, match="cost objective 'max' is not known; choose one of sum, minimax"):
        plan_schedules(cost, [5], "max")


@pytest.fixture(scope="module")
def pipe():
    return DigitPipeline.from_pretrained("mnist-dit", steps=6)


def test_an_edge_costs_the_error_of_caching_that_segment_alone(pipe, tmp_path):
    cost = cost_table.measure_costs(pipe, "taylorseer", 2, tmp_path, progress=False)
    T = pipe.steps
    assert cost.shape == (T + 1, T + 1) and cost[0, 1] == 0 and (cost.diagonal(1) == 0).all()
    classes, seeds = calibration_pairs(2)
    objective = rollout_objective(pipe, get_mechanism("taylorseer"), classes, seeds, pipe(classes, seeds))
    for i, j in ((0, 3), (2, 6), (1, 5)):
        assert cost_table.segment_steps(T, i, j) == tuple(s for s in range(T) if s <= i or s >= j)
        assert cost[i, j].item() == pytest.approx(objective([cost_table.segment_steps(T, i, j)])[0], rel=1e-6)
    assert (cost[0, 2:] > 0).all()  # every segment that caches something costs something


def test_a_stopped_measurement_resumes_to_the_same_table(pipe, tmp_path, monkeypatch):
    whole = cost_table.measure_costs(pipe, "reuse", 2, tmp_path / "whole", progress=False, chunk=4)
    calls = {"n": 0}
    real = cost_table.rollout_objective

    def stops_after_two_chunks(*args, **kwargs):
        evaluate = real(*args, **kwargs)

        def counted(candidates):
            calls["n"] += 1
            if calls["n"] > 2:
                raise KeyboardInterrupt
            return evaluate(candidates)
        return counted

    monkeypatch.setattr(cost_table, "rollout_objective", stops_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        cost_table.measure_costs(pipe, "reuse", 2, tmp_path / "stopped", progress=False, chunk=4)
    _, measured, _ = cost_table.load_table(tmp_path / "stopped" / cost_table.TABLE)
    assert int(measured.sum()) == 8  # two chunks of four edges were kept
    monkeypatch.setattr(cost_table, "rollout_objective", real)
    with pytest.raises(RecacheError, match="already holds a cost table; resume it"):
        cost_table.measure_costs(pipe, "reuse", 2, tmp_path / "stopped", progress=False, chunk=4)
    resumed = cost_table.measure_costs(pipe, "reuse", 2, tmp_path / "stopped", resume=True, progress=False, chunk=4)
    torch.testing.assert_close(resumed, whole, rtol=1e-6, atol=0)
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == [cost_table.TABLE]


def test_a_damaged_table_is_refused_and_left_as_it_is(pipe, tmp_path):
    (tmp_path / cost_table.TABLE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}")
    before = (tmp_path / cost_table.TABLE).read_bytes()
    with pytest.raises(RecacheError, match="cannot be read .* it is left as it is"):
        cost_table.measure_costs(pipe, "reuse", 2, tmp_path, resume=True, progress=False)
    assert (tmp_path / cost_table.TABLE).read_bytes() == before


def test_the_cli_plans_every_budget_on_one_table_and_the_schedules_run(tmp_path, capsys):
    out = tmp_path / "path"
    assert main(["search", "--method", "path", "--steps", "8", "--budgets", "2,4", "--pairs", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cost table of 28 segments on 2 calibration pairs" in printed and "k = 4 of 8: " in printed
    assert main(["search", "--method", "path", "--steps", "8", "--budget", "3", "--pairs", "2", "--cost", "minimax",
                 "--out", str(out), "--resume"]) == 0  # a new budget on the measured table
    schedule = Schedule.load(out / "schedule-k3.json")
    assert (schedule.k, schedule.metadata["objective"], schedule.metadata["mechanism"]) == (3, "minimax", "taylorseer")
    meta = Schedule.load(out / "schedule-k4.json").metadata
    assert "fallback" in meta or meta["guard_loss"] <= meta["uniform_loss"]  # the guard compared it
    capsys.readouterr()
    assert main(["sample", "--steps", "8", "--per-class", "1", "--schedule", str(out / "schedule-k4.json"),
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert "realised full passes per sample: 4" in capsys.readouterr().out


def test_a_search_can_start_from_the_plan(tmp_path, capsys):
    out = tmp_path / "path"
    assert main(["search", "--method", "path", "--steps", "8", "--budgets", "4", "--pairs", "2",
                 "--out", str(out)]) == 0
    plan = Schedule.load(out / "schedule-k4.json")
    assert main(["search", "--steps", "8", "--budget", "4", "--pairs", "2", "--sa-iters", "5", "--hc-iters", "2",
                 "--start", str(out / "schedule-k4.json"), "--out", str(tmp_path / "search")]) == 0
    history = [json.loads(line) for line in (tmp_path / "search" / "history.jsonl").read_text().splitlines()]
    assert history[0]["phase"] == "init" and history[0]["steps"] == list(plan.steps)
    searched = Schedule.load(tmp_path / "search" / "schedule.json")
    assert searched.metadata["search_loss"] <= history[0]["loss"]
    assert searched.metadata["search"]["start"] == list(plan.steps)


@pytest.mark.parametrize("key, value", [("model", "mnist-flux"), ("guidance", 4.0), ("pairs", 8)])
def test_a_table_of_another_sampler_is_refused_naming_the_setting(tmp_path, key, value):
    identity = {"model": "mnist-dit", "T": 4, "sigmas": "linear", "guidance": 2.0, "mechanism": "reuse", "pairs": 4}
    cost_table._save(tmp_path / cost_table.TABLE, torch.zeros(5, 5, dtype=torch.float64),
                     torch.ones(5, 5, dtype=torch.bool), identity)
    assert cost_table.load_table(tmp_path / cost_table.TABLE, identity)[2] == identity
    with pytest.raises(RecacheError, match=f"was measured with {key} = {identity[key]!r}, this run has {value!r}"):
        cost_table.load_table(tmp_path / cost_table.TABLE, {**identity, key: value})


@pytest.mark.parametrize("identity, cost", [
    ({"T": "4"}, torch.zeros(5, 5, dtype=torch.float64)),  # T not a number
    ({"T": 4}, torch.zeros(4, 4, dtype=torch.float64)),  # shape against T
    ({"T": 4}, torch.full((5, 5), float("nan"), dtype=torch.float64)),
    ({"T": 4}, -torch.ones(5, 5, dtype=torch.float64)),
])
def test_damaged_tables_are_one_line(tmp_path, identity, cost):
    path = tmp_path / cost_table.TABLE
    cost_table._save(path, cost, torch.ones_like(cost, dtype=torch.bool), identity)
    with pytest.raises(RecacheError, match="is damaged .* it is left as it is"):
        cost_table.load_table(path)


def test_a_plan_that_loses_to_uniform_on_the_calibration_pairs_is_replaced_and_said(pipe, tmp_path, monkeypatch):
    T = pipe.steps

    def misleading_costs(pipe, mechanism, pairs, out, **kw):
        cost = torch.triu(torch.ones(T + 1, T + 1, dtype=torch.float64), diagonal=1)
        cost[0, T - 2] = cost[T - 2, T - 1] = cost[T - 1, T] = 0.0  # "cache steps 1..T-3 for free": it does not add up
        return cost

    monkeypatch.setattr(cost_table, "measure_costs", misleading_costs)
    (schedule,) = cost_table.plan_from_calibration(pipe, "reuse", 2, [3], tmp_path, progress=False).values()
    assert schedule.metadata["fallback"] == "uniform" and schedule.metadata["planned_steps"] == [0, T - 2, T - 1]
    assert schedule.steps == Schedule.uniform(T, 3).steps
    assert schedule.metadata["guard_loss"] > schedule.metadata["uniform_loss"]
    assert schedule.metadata["guard_seeds"] == [2, 17]  # the 16 calibration pairs after the table's two
    assert Schedule.load(tmp_path / "schedule-k3.json").metadata["fallback"] == "uniform"
