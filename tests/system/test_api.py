"""The Python API (docs/api.md): README's example runs as written, and the API is what the CLI runs."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from fedbpt.api import Classifier, RunReport, local_service, run_federation

ROOT = Path(__file__).resolve().parents[2]


def _readme_python() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "README's Python section has one example"
    return blocks[0]


def test_readme_example_runs_as_written_and_the_classifier_is_what_the_cli_runs(tmp_path, monkeypatch):
    from fed_clients.data import load_splits
    from fed_clients.prompt_file import read_prompt
    from fedbpt import cli

    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(_readme_python(), "README.md", "exec"), scope)
    report = scope["report"]
    assert isinstance(report, RunReport)
    assert report.raw == json.loads((report.path / "report.json").read_text())
    assert report.served in ("tuned", "baseline") and report.test_examples == 100
    assert len(report.rounds) == 1 and report.rounds[0]["state"] == "merged"
    printed = out.getvalue().strip().splitlines()
    prompt = read_prompt(str(report.prompt_path))
    assert printed[-2] == f"{report.served} {report.served_test_accuracy} {report.calibrated_zero_shot_test_accuracy}"
    predictions = eval(printed[-1])  # the list the example printed
    assert len(predictions) == 2 and set(predictions) <= set(prompt.task.names)

    # `fedbpt evaluate` and Classifier.evaluate: the same numbers on the same labelled file.
    data = tmp_path / "labelled.jsonl"
    examples = load_splits("default", prompt.task)["test"][:40]
    data.write_text(
        "".join(
            json.dumps({**ex.fields, prompt.task.label_column: prompt.task.names[ex.label]}) + "\n" for ex in examples
        )
    )
    # float32: both passes must score alike, which bf16 with a warm prefix cache does not promise to the last bit.
    with local_service(dtype="float32") as (url, key):
        with Classifier.open(report.prompt_path, url, key) as clf:
            api = clf.evaluate(data, baseline=True)
            predicted = clf.predict([dict(ex.fields) for ex in examples])
            with pytest.raises(ValueError, match="lacks the task's field"):
                clf.predict([{"nothing": "here"}])
        cli.main(
            [
                "evaluate",
                "--prompt",
                str(report.prompt_path),
                "--service",
                url,
                "--api-key",
                key,
                "--data",
                str(data),
                "--baseline",
                "--output",
                str(tmp_path / "eval.json"),
            ]
        )
    from_cli = json.loads((tmp_path / "eval.json").read_text())
    assert api["examples"] == 40
    hits = [p == prompt.task.names[ex.label] for p, ex in zip(predicted, examples)]
    assert sum(hits) / len(hits) == pytest.approx(api["served"]["accuracy"], abs=1e-12)
    for which in ("served", "tuned", "manual"):
        assert api[which] == from_cli[which], which


def test_a_bad_setting_fails_before_any_process_starts(tmp_path):
    with pytest.raises(ValueError):
        run_federation(rounds=0, runs_dir=str(tmp_path))
    with pytest.raises(ValueError, match="robust_merge"):
        run_federation(run={"robust_merge": "mean"}, runs_dir=str(tmp_path))
    assert not any(tmp_path.iterdir()), "nothing written for a run that cannot start"
