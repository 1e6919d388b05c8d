import pytest

from recache.evaluation.report import markdown_paired_table, paired_comparison, summarize


def _rows(policy, rel_l2, mechanism="reuse", k=5):
    return [{"policy": policy, "mechanism": mechanism, "k": k, "T": 50, "class": i % 10, "seed": 900_000 + i,
             "full_passes": k, "flops_reduction": 10.0, "speedup": None, "rel_l2": v, "psnr": 30.0, "ssim": 0.9,
             "feature_distance": 2 * v, "class_correct": 1.0} for i, v in enumerate(rel_l2)]


def test_paired_comparison_verdicts():
    base = [0.10, 0.20, 0.30, 0.40]
    rows = (_rows("uniform", base) + _rows("better", [v - 0.05 for v in base])
            + _rows("same", [v + (-0.01) ** i for i, v in enumerate(base)]))
    rows += _rows("worse", [v + 0.02 + 0.001 * i for i, v in enumerate(base)])
    by_policy = {e["policy"]: e for e in paired_comparison(rows)}
    assert set(by_policy) == {"better", "same", "worse"}
    assert by_policy["better"]["rel_l2"]["diff"] == pytest.approx(-0.05)
    assert by_policy["better"]["rel_l2"]["se"] == pytest.approx(0.0, abs=1e-12)
    assert (by_policy["better"]["rel_l2"]["verdict"] == "better"
            and by_policy["better"]["feature_distance"]["verdict"] == "better")
    assert by_policy["worse"]["rel_l2"]["verdict"] == "worse"
    assert by_policy["same"]["rel_l2"]["verdict"] == "tie"
    assert by_policy["better"]["rel_l2"]["baseline"] == pytest.approx(0.25)
    assert "0.2500 -> 0.2000 (-0.0500 ± 0.0000, **better**)" in markdown_paired_table(paired_comparison(rows))


def test_pairs_only_with_the_same_mechanism_budget_and_samples():
    rows = _rows("uniform", [0.1, 0.2]) + _rows("mine", [0.1, 0.2], mechanism="delta") + _rows("mine", [0.1, 0.2], k=7)
    assert paired_comparison(rows) == []
    assert {(e["policy"], e["k"]) for e in summarize(rows)} == {("uniform", 5), ("mine", 5), ("mine", 7)}


def _with_passes(rows, passes):
    return [{**r, "full_passes": passes} for r in rows]


def test_headline_picks_the_best_at_the_budget_and_pairs_the_change():
    from recache.evaluation.compare import headline

    base = [1.0, 2.0, 3.0, 4.0]  # feature distance is 2 x these
    rows = _rows("uniform", base, "reuse") + _rows("uniform", [v * 0.9 for v in base], "taylorseer")
    rows += (_rows("teacache", [v * 0.8 for v in base])
             + _with_passes(_rows("magcache", [v * 0.1 for v in base]), 9))  # over budget
    rows += _rows("recache", [v * 0.6 for v in base], "hicache") + _rows("recache", [v * 0.7 for v in base], "reuse")
    entries, table = headline(rows, [5])
    (entry,) = entries
    assert ((entry["uniform"]["mechanism"], entry["best heuristic"]["policy"], entry["ReCache"]["mechanism"])
            == ("taylorseer", "teacache", "hicache"))
    assert entry["vs best heuristic"]["relative"] == pytest.approx(0.6 / 0.8 - 1)
    assert entry["vs uniform"]["relative"] == pytest.approx(0.6 / 0.9 - 1)
    assert entry["best"]["group"] == "ReCache" and entry["best"]["vs"] == "best heuristic"
    (row,) = [line for line in table.splitlines() if line.startswith("| 5 |")]
    assert "| ReCache **-25.0 % ± " in row and "magcache" not in row and "| - | - |" in row  # no search, no plan
    rows += _rows("budcache", [v * 0.5 for v in base], "taylorseer") + _rows("path", [v * 0.55 for v in base])
    (entry,), table = headline(rows, [5], costs={"path plan": "80 s, 4,900 rollouts"})
    assert (entry["best"]["group"], entry["best"]["vs"]) == ("BudCache", "path plan")
    assert entry["best"]["relative"] == pytest.approx(0.5 / 0.55 - 1)
    assert "| cost of the schedules | - | - | - | 80 s, 4,900 rollouts | - | | |" in table.splitlines()
    assert ("- Left out at k = 5: magcache / reuse (realised k = 9.00): more than half a pass from the budget."
            in table.splitlines())


def test_headline_says_which_budgets_it_leaves_out():
    from recache.evaluation.compare import headline

    base = [1.0, 2.0, 3.0, 4.0]
    rows = _rows("uniform", base) + _rows("recache", base, "hicache") + _with_passes(_rows("magcache", base), 9)
    entries, table = headline(rows, [5])
    assert entries == []
    assert table.splitlines() == ["- No row at k = 5: no calibrated heuristic within half a pass of the budget "
                                  "(left out: magcache / reuse (realised k = 9.00))."]
    assert headline(rows, [7]) == ([], "")  # nothing evaluated at k = 7: nothing to say
    assert headline(_rows("uniform", base) + _rows("teacache", base), [5]) == ([], "")  # no ReCache at all: no headline


def test_summary_reports_the_spread_of_realised_budgets():
    rows = _rows("teacache", [0.1, 0.2, 0.3])
    rows[0]["full_passes"], rows[1]["full_passes"] = 4, 7
    (entry,) = summarize(rows)
    assert (entry["realised_k"], entry["realised_k_min"], entry["realised_k_max"]) == (pytest.approx(16 / 3), 4, 7)
