"""The sample-efficiency study's arithmetic: how many iterations a sequence budget buys, and the curve over seeds."""

from __future__ import annotations

import argparse
import json

import pytest

from bench.curve import curves, main
from bench.prompt_study import iterations_within


@pytest.mark.parametrize(
    "fitness,popsize,batch,every,budget,expected",
    [
        # 10 x 32 a batch, plus every training example (500) at each refit: k=3 costs 960 + 500.
        ("robust-bias", 10, 32, 10, 1500, 3),
        ("robust-bias", 10, 32, 10, 24940, 67),
        ("ce", 8, 16, 10, 25000, 195),  # no refits: 25000 // 128
        ("ce", 8, 16, 10, 10, 1),  # a budget under one iteration still runs one
    ],
)
def test_the_budget_buys_the_most_iterations_that_fit(fitness, popsize, batch, every, budget, expected):
    args = argparse.Namespace(fitness=fitness, popsize=popsize, batch_size=batch, bias_every=every, budget=budget)
    k = iterations_within(args, 500)
    assert k == expected
    refits = 500 if fitness == "robust-bias" else 0

    def cost(n):
        return n * popsize * batch + -(-n // every) * refits

    assert cost(k) <= budget or k == 1
    assert cost(k + 1) > budget


def _row(seed, basis, calibrated, points):
    return {
        "args": {"seed": seed, "basis": basis, "fitness": "robust-bias"},
        "calibrated_zero_shot": calibrated,
        "curve": [{"sequences": s, "tuned": 0.6, "tuned_calibrated": a, "vs_calibrated_p": p} for s, a, p in points],
    }


def test_curves_group_by_setting_and_list_seeds_in_order(tmp_path, capsys):
    rows = [
        _row(1, "normal", 0.72, [(1100, 0.71, 0.5), (2100, 0.74, 0.2)]),
        _row(0, "normal", 0.70, [(1000, 0.70, 1.0), (2000, 0.74, 0.01)]),
        _row(0, "embeddings", 0.70, [(1000, 0.69, 0.6)]),
    ]
    table = curves(rows)
    assert sorted(table) == ["basis=embeddings", "basis=normal"]
    first, second = table["basis=normal"]
    assert first["sequences"] == 1050 and first["mean"] == pytest.approx(0.705) and first["seeds"] == [0, 1]
    assert second["gains"] == [4.0, 2.0] and second["gain"] == pytest.approx(0.03)
    assert second["sd"] == pytest.approx(0.0) and second["p"] == [0.01, 0.2]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    main([str(path), "--plot", str(tmp_path / "curve.png")])
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert "| basis=normal | 2,050 | 0.740 +- 0.000 | +4.0, +2.0 | 0.01, 0.2 |" in capsys.readouterr().out
