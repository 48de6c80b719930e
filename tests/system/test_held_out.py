"""On data the project never saw, what a run serves is never worse than the calibrated baseline.

The tweets of the ICWSM 2014 archive (fedbpt_assets.held_out_tweets) feed no task, default or measurement of the
project. A user's path end to end: a task spec file with string labels, a CSV of their own, `fedbpt demo --task FILE
--data FILE` on the real embedded model, which holds out a test split, federates 3 clients and serves a prompt.
"""

from __future__ import annotations

import csv
import json

import numpy as np

from fed_clients.prompt_file import read_prompt
from fedbpt_assets import held_out_tweets
from tests.system.test_data_owner import cli

TASK = {
    "format": "fedbpt-task/1",
    "name": "tweets",
    "template": "Tweet: {text}\nSentiment:{mask}",
    "label_words": {"negative": " negative", "positive": " positive"},
    "label_column": "sentiment",
}


def test_the_served_prompt_is_not_worse_than_the_calibrated_baseline_on_unseen_data(tmp_path, default_model_dir):
    tweets = sorted(held_out_tweets().items())
    rng = np.random.default_rng(23)
    picked = [tweets[i] for i in np.sort(rng.choice(len(tweets), 2000, replace=False))]
    data = tmp_path / "tweets.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "sentiment"])
        writer.writerows((text, ("negative", "positive")[label]) for text, label in picked)
    task = tmp_path / "tweets.json"
    task.write_text(json.dumps(TASK))
    flags = {
        "--task": task,
        "--data": data,
        "--label-words": "",  # the spec's own words
        "--clients": 3,
        "--rounds": 2,
        "--per-class": 60,
        "--local-popsize": 4,
        "--local-iterations": 1,
        "--batch-size": 16,
        "--test-size": 400,
        "--runs-dir": tmp_path / "runs",
        "--name": "tweets",
    }
    done = cli("demo", *(str(x) for kv in flags.items() for x in kv), env={"OMP_NUM_THREADS": "2"}, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "tweets" / "report.json").read_text())
    assert report["test_examples"] == 400 and report["calibration_examples"] == 120
    assert report["served"] in ("tuned", "baseline")
    assert report["served_test_accuracy"] >= report["calibrated_zero_shot_test_accuracy"] - 0.01, report
    assert "served prompt: " in done.stdout and report["served_selection"]["reason"] in done.stdout
    prompt = read_prompt(tmp_path / "runs" / "tweets" / "prompt.json")
    assert prompt.served == report["served"] and prompt.task.names == ("negative", "positive")
    assert prompt.metrics["served_test_accuracy"] == report["served_test_accuracy"]
