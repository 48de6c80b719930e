"""`fedbpt demo` end to end at a tiny budget: real processes, the report's baselines and the prompt file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fed_clients.tasks import parse_label_words
from fedbpt.demo import PRESETS, DemoConfig, add_arguments, config_from, run_demo
from fedbpt_wire.schemas import Tensor
from fedbpt_wire.tensors import decode_tensor


def test_parse_label_words_keeps_each_words_space():
    assert parse_label_words(" terrible, great") == [" terrible", " great"]
    for bad in (" alone", " a,", ""):
        with pytest.raises(ValueError, match="two or more"):
            parse_label_words(bad)


def _parsed(argv: list[str]) -> dict:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)
    return {k: getattr(args, k) for k in DemoConfig.__dataclass_fields__ if getattr(args, k, None) is not None}


def test_the_preset_sets_the_budget_and_flags_given_win():
    def no_gpu():
        return False

    def gpu():
        return True

    cpu = config_from(_parsed([]), no_gpu)
    assert cpu.preset == "cpu"
    assert {k: v for k, v in vars(cpu).items() if k != "name"} == {
        k: v for k, v in vars(DemoConfig(preset="cpu")).items() if k != "name"
    }
    auto_gpu = config_from(_parsed([]), gpu)
    assert auto_gpu.preset == "gpu"
    assert {k: getattr(auto_gpu, k) for k in PRESETS["gpu"]} == PRESETS["gpu"]
    # A flag on the command line beats the preset; the rest of the preset still applies.
    mixed = config_from(_parsed(["--preset", "gpu", "--rounds", "3", "--prompt-placement", "after-text"]), no_gpu)
    assert (mixed.preset, mixed.rounds, mixed.prompt_placement, mixed.prompt_length) == ("gpu", 3, "after-text", 20)
    # "cpu" asked for explicitly is not overruled by a GPU.
    assert config_from(_parsed(["--preset", "cpu"]), gpu).local_popsize == DemoConfig().local_popsize
    with pytest.raises(ValueError, match="--preset must be one of"):
        config_from({"preset": "tpu"}, no_gpu)


def test_a_tiny_demo_reports_every_baseline_and_keeps_the_prompt(tmp_path, default_model_dir):
    cfg = DemoConfig(
        name="tiny",
        runs_dir=str(tmp_path),
        clients=2,
        rounds=1,
        per_class=4,
        intrinsic_dim=8,
        local_popsize=3,
        local_iterations=1,
        batch_size=4,
        test_size=24,
        dtype="float32",
    )
    report = run_demo(cfg)
    out = tmp_path / "tiny"
    saved = json.loads((out / "report.json").read_text())
    assert saved["test_examples"] == 24 and saved["calibration_examples"] == 8
    for key in (
        "zero_shot_test_accuracy",
        "calibrated_zero_shot_test_accuracy",
        "tuned_test_accuracy",
        "tuned_calibrated_test_accuracy",
    ):
        assert 0.0 <= saved[key] <= 1.0 and saved[key] * 24 == round(saved[key] * 24)
    assert 0.0 < saved["tuned_vs_zero_shot_p"] <= 1.0 and 0.0 < saved["tuned_vs_calibrated_p"] <= 1.0
    assert saved["label_words"] == [" terrible", " great"]
    assert [r["state"] for r in saved["rounds"]] == ["merged"] and saved["rounds"][0]["bytes_up"] > 0
    prompt = json.loads((out / "prompt.json").read_text())
    z = decode_tensor(Tensor.model_validate(prompt["z"]))
    assert z.shape == (8,) and np.isfinite(z).all()
    assert prompt["projection"]["placement"] == "after-text" and prompt["projection"]["init"] == "zeros"
    assert "{prompt}" in prompt["task"]["template"] and prompt["task"]["label_words"] == [" terrible", " great"]
    assert prompt["metrics"]["tuned_test_accuracy"] == report["tuned_test_accuracy"]
    # What is served: chosen on the clients' validation splits, with its read-out bias; serving the baseline is
    # exactly the calibrated baseline (the same bias, fitted on the same examples).
    assert prompt["format"] == "fedbpt-prompt/2" and prompt["served"] == report["served"]
    assert len(prompt["bias"]) == 2 and prompt["selection"]["reason"] == report["served_selection"]["reason"]
    if report["served"] == "baseline":
        assert report["served_test_accuracy"] == report["calibrated_zero_shot_test_accuracy"]
        assert report["served_vs_calibrated_p"] == 1.0
    rescore_the_saved_prompt(out, report, default_model_dir)


def rescore_the_saved_prompt(out, report, model_dir):
    """The prompt file alone, put to use as a user would (`fedbpt evaluate` against a fresh service of the same
    model), scores the report's served accuracy on the same test examples."""
    import argparse

    from fed_clients.data import load_splits
    from fed_clients.prompt_file import read_prompt
    from fedbpt.demo import write_examples
    from fedbpt.loopback import serve_app
    from fedbpt.use import evaluate
    from inference_service.app import create_app
    from inference_service.auth import KeyStore
    from inference_service.torch_engine import TorchEngine

    prompt = read_prompt(out / "prompt.json")
    test = load_splits("default", prompt.task)["test"][: report["test_examples"]]
    data = write_examples(out / "rescore" / "test.jsonl", test, prompt.task)
    engine = TorchEngine(str(model_dir), dtype="float32", display_name=prompt.model["name"])
    with serve_app(create_app(engine, KeyStore({"k": None}))) as url:
        args = argparse.Namespace(
            prompt=str(out / "prompt.json"),
            service=url,
            api_key="k",
            ca_cert=None,
            timeout=300.0,
            data=str(data),
            baseline=True,
            output=str(out / "rescore" / "evaluation.json"),
        )
        assert evaluate(args) == 0
    result = json.loads((out / "rescore" / "evaluation.json").read_text())
    assert result["served_prompt"] == report["served"]
    assert result["served"]["accuracy"] == pytest.approx(report["served_test_accuracy"], abs=1e-12)
    assert result["manual"]["accuracy"] == pytest.approx(report["zero_shot_test_accuracy"], abs=1e-12)
    assert (out / "accuracy.png").stat().st_size > 10_000


def test_each_merged_round_shows_the_served_comparison_beside_the_raw_accuracy():
    import io

    from fedbpt.demo import Progress
    from fedbpt_wire.federation import RoundRecord, RunConfig, RunStatus
    from fedbpt_wire.served import ValidationComparison

    versus = ValidationComparison(
        examples=31,
        tuned_loss=0.43,
        tuned_correct=28,
        baseline_loss=0.44,
        baseline_correct=23,
        tuned_only=5,
        baseline_only=0,
    )
    rounds = [
        RoundRecord(round=0, state="merged", selected=["a"], reporters=["a"], sigma_before=1.0, opened_at=0.0),
        RoundRecord(
            round=1,
            state="merged",
            selected=["a"],
            reporters=["a"],
            sigma_before=1.0,
            val_accuracy=0.516,
            val_loss=1.1855,
            vs_baseline=versus,
            opened_at=1.0,
        ),
    ]
    out = io.StringIO()
    Progress(2, out).update(
        RunStatus(config=RunConfig(run_id="r"), state="running", round=2, clients=["a"], history=rounds)
    )
    first, second = out.getvalue().splitlines()
    assert "val acc n/a" in first and "with bias" not in first
    assert "val acc 0.516 | val loss 1.1855 | with bias 0.903 vs baseline 0.742 (31) | queries" in second
