"""`fedbpt bench`: a small real grid against a real service, its resumption, and the report's arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedbpt.bench.grid import Grid
from fedbpt.bench.report import first_reaching, summarize, wire_sizes, write_report
from fedbpt.bench.runs import Bench
from fedbpt.loopback import serve_app
from inference_service.app import create_app
from inference_service.auth import KeyStore
from inference_service.torch_engine import TorchEngine

KEY = "bench-key"


def test_first_reaching_95_percent():
    assert first_reaching([0.5, 0.7, 0.8, 0.78, 0.8]) == 2  # 0.95 x 0.8 = 0.76
    assert first_reaching([0.9, 0.5, 0.8]) == 0
    assert first_reaching([None, 0.8]) == 1
    assert first_reaching([]) is None


def row(method, seed, acc, curve, rounds, clients=2, rss=50.0):
    return {
        "key": f"t/r/p/seed{seed}/{method}",
        "task": "t",
        "regime": "r",
        "partition": "p",
        "seed": seed,
        "method": method,
        "test_accuracy": acc,
        "curve": curve,
        "clients": clients,
        "client_rss_mb": rss,
        "client_holds": "x",
        "wall_seconds": 10.0,
        "rounds": [{"queries": q, "sequences": 10 * q, "bytes_up": up, "bytes_down": down} for q, up, down in rounds],
        "queries": sum(q for q, _, _ in rounds),
        "sequences": sum(10 * q for q, _, _ in rounds),
        "bytes_up": sum(u for _, u, _ in rounds),
        "bytes_down": sum(d for _, _, d in rounds),
        "service_bytes_up": 0,
        "service_bytes_down": 0,
    }


def test_summary_by_hand():
    rows = [
        row("fedbpt", 0, 0.80, [0.5, 0.7, 0.8], [(4, 100, 300), (4, 100, 300)]),
        row("fedbpt", 1, 0.70, [0.6, 0.7, 0.7], [(6, 200, 500), (6, 200, 500)]),
    ]
    (s,) = summarize(rows)
    assert s["accuracy"] == f"{75.0:.1f} ± {100 * np.std([0.8, 0.7], ddof=1):.1f}"
    assert s["queries"] == 10  # (8 + 12) / 2
    # seed 0 reaches 0.76 at point 2 (after 2 rounds, 8 queries); seed 1 reaches 0.665 at point 1 (6 queries)
    assert s["queries_to_95"] == 7 and s["sequences_to_95"] == 70
    # per client and round: seed 0 100/2 up, 300/2 down; seed 1 200/2, 500/2
    assert s["up_per_client_round"] == 75 and s["down_per_client_round"] == 200
    assert s["bytes_total"] == (800 + 1400) / 2


def test_summary_pairs_each_method_with_the_baselines_on_the_same_examples():
    zero = [row("zero-shot", s, 0.5, [], []) | {"correct": [1, 0, 0, 0, 0, 0]} for s in (0, 1)]
    cal = [row("calibrated", s, 0.5, [], []) | {"correct": [1, 1, 1, 0, 0, 0]} for s in (0, 1)]
    fed = [row("fedbpt", s, 0.8, [], []) | {"correct": [1, 1, 1, 1, 1, 0]} for s in (0, 1)]
    by = {s["method"]: s for s in summarize(zero + cal + fed)}
    # Pooled over both seeds: vs zero-shot 8 discordant pairs, all for FedBPT: p = 2 / 2**8.
    assert by["fedbpt"]["p_vs_zero_shot"] == pytest.approx(2 / 2**8)
    assert by["fedbpt"]["p_vs_calibrated"] == pytest.approx(2 / 2**4)
    assert by["calibrated"]["p_vs_zero_shot"] == pytest.approx(2 / 2**4) and by["calibrated"]["p_vs_calibrated"] is None
    assert by["zero-shot"]["p_vs_zero_shot"] is None


def test_wire_sizes_shrink_with_the_seed_form():
    rows = wire_sizes(["a short review . Sentiment:{mask}"] * 4, [" negative", " positive"])
    for r in rows:
        assert r["seed"] < r["float16"] < r["float32"]
        # float32 prompts in base64: 4 bytes per value x 4/3, plus the texts
        assert r["float32"] == pytest.approx(r["texts_and_framing"] + 4 * r["P"] * r["L"] * r["D"] * 4 / 3, rel=0.01)
        assert r["seed"] == pytest.approx(r["texts_and_framing"] + 4 * r["P"] * r["d"] * 4 / 3, rel=0.05, abs=200)


@pytest.fixture(scope="module")
def service_url(default_model_dir):
    engine = TorchEngine(str(default_model_dir), dtype="float32")
    with serve_app(create_app(engine, KeyStore({KEY: None}))) as url:
        yield url


def model_parameter_mib(model_dir) -> float:
    """The model's parameters at float32, from its checkpoint's tensor shapes."""
    from safetensors import safe_open

    count = 0
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        for name in f.keys():
            count += int(np.prod(f.get_slice(name).get_shape()))
    return 4 * count / 2**20


# Every method of the grid, a white-box FedPrompt training of SmolLM2 among them: minutes on two cores, so with
# `make test-slow`. The methods and the report's arithmetic have tests of their own in `make test`; a grid's
# resumption and its clients' memory are checked here only.
@pytest.mark.slow
def test_a_small_grid_end_to_end_and_resumed(service_url, default_model_dir, default_data_dir, tmp_path):
    grid = Grid(
        "tiny",
        tasks=("rotten_tomatoes",),
        regimes={"few-shot": 6},
        seeds=(0,),
        methods=("zero-shot", "calibrated", "icl", "fedbpt", "local-only", "fedprompt"),
        clients=2,
        rounds=2,
        intrinsic_dim=8,
        prompt_length=2,
        popsize=4,
        local_iterations=1,
        batch_size=4,
        test_size=24,
        curve_size=12,
        dtype="float32",
    )
    bench = Bench(grid, tmp_path, service_url, KEY)
    rows = bench.run(progress=lambda line: None)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"zero-shot", "calibrated", "icl", "fedbpt", "local-only", "fedprompt"}
    assert len(by["zero-shot"]["correct"]) == len(by["calibrated"]["correct"]) == len(by["fedbpt"]["correct"]) == 24
    assert by["calibrated"]["queries"] == 1  # the pool's zero-shot logits, to fit the bias on
    fed = by["fedbpt"]
    assert len(fed["rounds"]) == 2 and all(r["clients"] == 2 for r in fed["rounds"])
    # Each test accuracy is the share of its own per-example record; the curve's last point is the final prompt on
    # the first curve_size test examples.
    for method in ("zero-shot", "calibrated", "fedbpt", "local-only"):
        assert by[method]["test_accuracy"] == pytest.approx(np.mean(by[method]["correct"]), abs=1e-12), method
    assert len(fed["curve"]) == 3 and fed["curve"][-1] == pytest.approx(np.mean(fed["correct"][:12]), abs=1e-12)
    # One service call per client per round for validation and for each local iteration, and one for the final mean;
    # and once per client, the manual prompt on its own data: the baseline the served prompt competes with.
    assert fed["queries"] == 2 * 2 * (1 + 1 + 1) + 2
    assert fed["bytes_up"] > 0 and fed["service_bytes_up"] > fed["service_bytes_down"] > 0
    assert by["local-only"]["curve"] == []
    assert by["zero-shot"]["queries"] == 0
    assert by["icl"]["inference_tokens_per_example"] > 0
    white = by["fedprompt"]
    assert len(white["curve"]) == 3 and len(white["rounds"]) == 2 and white["queries"] == 0
    # Memory, against the model measured here: a black-box client peaks below the size of the model's weights,
    # so it cannot be holding them; the white-box client holds them on top of everything a client process has.
    weights = model_parameter_mib(default_model_dir)
    assert fed["client_rss_mb"] < weights < white["client_rss_mb"] - fed["client_rss_mb"]
    # Its exchange is the L x D prompt each way, per client and round: bigger than FedBPT's d floats up.
    assert white["bytes_up"] > 2 * 2 * 4 * 2 * 576

    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 6
    again = Bench(grid, tmp_path, service_url, KEY)  # finished runs are kept, nothing reruns
    assert again.run(progress=lambda line: pytest.fail(f"reran: {line}")) == [json.loads(x) for x in lines]

    text = write_report(grid, rows, tmp_path)
    assert "FedBPT" in text and "seed + z" in text
    assert (tmp_path / "curves_rotten_tomatoes_few-shot_dir0.5.png").stat().st_size > 10_000
    assert (tmp_path / "summary.csv").read_text().count("\n") == 7
