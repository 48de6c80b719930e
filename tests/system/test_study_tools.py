"""The sample-efficiency study's arithmetic: how many iterations a sequence budget buys, the curve over seeds, the
cue start (z = 0 is the manual prompt) and the incumbent rule on a real model."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest

from bench.curve import curves, main
from bench.prompt_study import cue_start, iterations_within
from bench.prompt_study import main as study
from fed_clients.tasks import get_task, with_placement


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


def test_curves_read_the_incumbents_accuracy_when_asked_and_old_runs_at_todays_defaults():
    rows = [_row(0, "normal", 0.70, [(1000, 0.70, 1.0)]), _row(1, "normal", 0.72, [(1000, 0.74, 0.3)])]
    rows[0]["curve"][0].update(incumbent_calibrated=0.75, incumbent_vs_calibrated_p=0.02)
    rows[1]["curve"][0].update(incumbent_calibrated=0.74, incumbent_vs_calibrated_p=0.3)
    rows[1]["args"]["step_scale"] = 1.0  # a run from after the argument, at its default: the same setting
    ((label, (point,)),) = curves(rows, "incumbent").items()
    assert label == "all runs" and point["gains"] == [5.0, 2.0] and point["p"] == [0.02, 0.3]
    assert curves(rows)[label][0]["gains"] == [0.0, 2.0]


def test_curves_keep_only_the_runs_a_filter_names(tmp_path, capsys):
    rows = [
        _row(0, "normal", 0.70, [(1000, 0.70, 1.0)]),
        _row(0, "embeddings", 0.70, [(1000, 0.73, 0.1)]),
        {**_row(1, "embeddings", 0.72, [(1000, 0.74, 0.3)]), "args": {"seed": 1, "basis": "embeddings", "init": "cue"}},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    table = main([str(path), "--where", "basis=embeddings,fitness=robust-bias", "--where", "init=cue"])
    assert sorted(table) == ["fitness=None, init=cue", "fitness=robust-bias, init=None"]
    assert "basis=normal" not in capsys.readouterr().out
    # Flag spelling ("step-scale") and a run from before the argument (at its default) match too.
    assert sorted(main([str(path), "--where", "basis=embeddings,step-scale=1.0"])) == [
        "fitness=None, init=cue",
        "fitness=robust-bias, init=None",
    ]
    table = main([str(path), "--where", "the cue: init=cue", "--where", "basis=normal"])
    assert sorted(table) == ["fitness=robust-bias, basis=normal, init=None", "the cue"]
    assert table["the cue"][0]["seeds"] == [1]
    with pytest.raises(SystemExit, match="no run matches --where init=zeros"):
        main([str(path), "--where", "init=zeros"])
    with pytest.raises(SystemExit, match="no run records the incumbent"):
        main([str(path), "--served", "incumbent"])


def test_the_cue_start_reads_at_zero_as_the_manual_prompt(default_model_dir):
    from inference_service.engine import ScoreBatch
    from inference_service.limits import Limits
    from inference_service.torch_engine import TorchEngine

    engine = TorchEngine(str(default_model_dir), dtype="float32", device="cpu", limits=Limits())
    task = get_task("amazon_snippets", " terrible, great")
    cue_task, ids = cue_start(with_placement(task, "after-text"), engine.tokenizer)
    assert cue_task.causal_template == "Review: {text}{prompt}:{mask}"
    assert engine.tokenizer.decode(ids) == "\nSentiment"
    examples = [{"text": "Great product, works as described."}, {"text": "It broke after a day!"}]
    words = list(task.label_words)
    bare = np.zeros((1, 0, engine.info.hidden_size), np.float32)
    manual = engine.score(ScoreBatch(bare, [task.render(e, "causal") for e in examples], words)).logits
    prompt = np.asarray(engine.token_embeddings(ids), np.float32)[None]
    cue = engine.score(ScoreBatch(prompt, [cue_task.render(e, "causal") for e in examples], words)).logits
    np.testing.assert_allclose(cue, manual, atol=1e-4)
    with pytest.raises(ValueError, match="no cue words"):
        cue_start(replace(task, causal_template="Review: {text}{prompt} Sentiment{mask}"), engine.tokenizer)


def test_a_budgeted_study_keeps_its_budget_and_serves_the_incumbent_only_where_it_won(default_model_dir, tmp_path):
    out = tmp_path / "study.jsonl"
    common = (
        f"--model {default_model_dir} --placement after-text --anchor none --intrinsic-dim 8 --popsize 4 "
        "--batch-size 8 --per-class 8 --test-size 24 --fitness robust-bias --bias-every 2 --basis embeddings "
        f"--budget 200 --checkpoints 90 --out {out}"
    ).split()
    (row,) = study([*common, "--label-words", " terrible, great", "--init", "cue", "--step-scale", "0.5"])
    assert row["args"]["prompt_length"] == 3 and row["args"]["step_scale"] == 0.5
    # z = 0 is the manual prompt, so the start scores exactly what zero-shot does on the same examples.
    assert row["init_prompt_accuracy_200"] == row["zero_shot"]
    assert row["sequences"] <= 200 and len(row["curve"]) == 2
    assert [p["sequences"] for p in row["curve"]] == sorted(p["sequences"] for p in row["curve"])
    if row["incumbent_iteration"] is None:
        assert row["incumbent_calibrated"] == row["tuned_calibrated"]
    else:
        assert 0 <= row["incumbent_iteration"] < row["candidates"] // 4
    assert json.loads(out.read_text().splitlines()[0])["incumbent_calibrated"] == row["incumbent_calibrated"]
