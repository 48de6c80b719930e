"""The aggregator keeps the best validated global prompt and serves it only where it beats the baseline
(real HTTP: uvicorn on a free 127.0.0.1 port, real cma and SQLite)."""

from __future__ import annotations

import numpy as np

from tests.aggregator.test_aggregator import body, config, live, mean_of, register


def vs(examples, tuned_correct, baseline_correct, tuned_only, baseline_only, tuned_loss):
    return {
        "examples": examples,
        "tuned_loss": tuned_loss,
        "tuned_correct": tuned_correct,
        "baseline_loss": 0.6,
        "baseline_correct": baseline_correct,
        "tuned_only": tuned_only,
        "baseline_only": baseline_only,
    }


# Per round, what each of the two clients reports of the global prompt it was handed, against the baseline.
WORSE = vs(100, 60, 70, 2, 12, 0.70)
CLEAR_WIN = vs(100, 85, 70, 17, 2, 0.40)  # pooled over 2 clients: 34 vs 4 discordant, p ~ 1e-7
NOISE = vs(100, 72, 70, 6, 4, 0.35)  # lower loss, indistinguishable accuracy


def run(tmp_path, reports: list[dict]) -> tuple[dict, list[np.ndarray]]:
    """Two clients, len(reports) rounds; both report reports[r] in round r. The final global state and the mean
    each round handed out."""
    with live(config(rounds=len(reports), min_clients=2), tmp_path / "agg.db") as http:
        heads = [register(http, f"c{k}") for k in range(2)]
        handed = []
        for r, report in enumerate(reports):
            for k, h in enumerate(heads):
                task = http.get("/v1/round", headers=h).json()
                assert task["round"] == r and task["selected"], task
                if k == 0:
                    handed.append(mean_of(task["mean"]))
                b = body(r, mean_of(task["mean"]) + 0.1 * (k + 1))
                b["metrics"]["vs_baseline"] = report
                assert http.post("/v1/round/update", json=b, headers=h).status_code == 200
        state = http.get("/v1/global", headers=heads[0]).json()
        status = http.get("/v1/status").json()
    assert state["state"] == "done"
    pooled = status["history"][1]["vs_baseline"]
    assert pooled["examples"] == 200 and pooled["tuned_only"] == 2 * reports[1]["tuned_only"]
    return state, handed


def test_the_best_validated_round_is_served_where_it_beats_the_baseline(tmp_path):
    state, handed = run(tmp_path, [WORSE, CLEAR_WIN, WORSE])
    served = state["served"]
    assert served["served"] == "tuned" and served["round"] == 1 and served["distinguishable"]
    # The mean round 1 handed out (and its clients validated), not the last merge's.
    assert np.allclose(mean_of(served["mean"]), handed[1])
    assert not np.allclose(mean_of(served["mean"]), mean_of(state["mean"]))
    assert served["validation"]["tuned_correct"] == 170 and served["p_value"] < 0.05


def test_a_tuned_prompt_within_noise_of_the_baseline_is_not_served(tmp_path):
    state, _ = run(tmp_path, [WORSE, NOISE])
    served = state["served"]
    assert served["served"] == "baseline" and served["round"] == 1 and not served["distinguishable"]
    assert "cannot tell the two apart" in served["reason"]


def test_counts_that_cannot_be_true_are_refused_naming_the_field(tmp_path):
    with live(config(rounds=1), tmp_path / "agg.db") as http:
        h = register(http, "c0")
        task = http.get("/v1/round", headers=h).json()
        b = body(0, mean_of(task["mean"]))
        b["metrics"]["vs_baseline"] = vs(10, 11, 5, 6, 0, 0.3)
        r = http.post("/v1/round/update", json=b, headers=h)
        assert r.status_code == 422 and "metrics.vs_baseline" in r.text, r.text
        b["metrics"]["vs_baseline"] = {**vs(10, 7, 6, 2, 1, 0.3), "labels": [0, 1]}
        r = http.post("/v1/round/update", json=b, headers=h)
        assert r.status_code == 422 and "labels" in r.text, r.text
