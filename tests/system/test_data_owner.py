"""A data owner's whole path, by hand, as on separate machines: `fedbpt serve`, `fedbpt aggregator`, three
`fedbpt client` processes with their own files (CSV, TSV, JSONL; string labels) and a custom 3-class task spec,
then `fedbpt status`, `fedbpt report`, `fedbpt predict` and `fedbpt evaluate --baseline` on the files they wrote.

Every step is the real CLI in a subprocess, on a tiny random Llama (float32) so that it runs in seconds on two
cores. The aggregator is SIGKILLed and restarted while two clients wait for the third: they must ride it out.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from fed_clients.prompt_file import read_prompt
from fedbpt import launch
from fedbpt.loopback import free_port

from ..service.test_engine_contract import build_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
SVC_KEY, ENROLL, OPERATOR = "svc-key", "enroll-key", "operator-key"
WORDS = {"neg": "bad", "pos": "great", "mid": "fine"}  # each a single token of the tiny tokenizer, with its space
TASK = {
    "format": "fedbpt-task/1",
    "name": "tiny3",
    "template": "Review: {text}\nVerdict:{mask}",
    "label_words": {name: " " + word for name, word in WORDS.items()},
    "label_column": "verdict",
    "description": "three-way verdicts",
}
RUN_FLAGS = [
    "--rounds",
    "2",
    "--min-clients",
    "3",
    "--intrinsic-dim",
    "8",
    "--prompt-length",
    "2",
    "--local-popsize",
    "4",
    "--local-iterations",
    "2",
    "--round-timeout",
    "300",
    "--run-id",
    "owner",
]
BOUND_S = 300  # no step of a healthy run comes near it: a bound on a hang, not a timing assert


def cli(*args: str, env: dict | None = None, timeout: float = BOUND_S, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "fedbpt.cli", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(env),
    )


def child_env(extra: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra or {})}


def start(args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    return launch.spawn(args, log, child_env(env), cwd=cwd or ROOT)


def wait_until(
    check, what: str, proc: subprocess.Popen | None = None, log: Path | None = None, tries: int = 1200
) -> None:
    """Polls `check` (bounded by a number of tries, not a clock); fails early when `proc` died."""
    import time

    for _ in range(tries):
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited {proc.returncode}: {log.read_text()[-2000:] if log else ''}")
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.25)
    pytest.fail(f"gave up waiting for {what}")


def healthy(url: str) -> bool:
    return httpx.get(f"{url}/healthz", timeout=2).status_code == 200


def kill(proc: subprocess.Popen) -> None:
    launch.stop(proc, signal.SIGKILL)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("owner-llama"))


@contextlib.contextmanager
def service(model: Path, log: Path):
    url = f"http://127.0.0.1:{free_port()}"
    proc = start(
        ["serve", "--model", str(model), "--port", url.rsplit(":", 1)[1], "--dtype", "float32", "--threads", "1"],
        log,
        env={"FEDBPT_API_KEYS": SVC_KEY},
    )
    try:
        wait_until(lambda: healthy(url), "the service", proc, log)
        yield url
    finally:
        kill(proc)


def write_data(root: Path) -> dict[str, Path]:
    """Three clients' files in three formats, a labelled test file and unlabelled new texts; labels by name."""
    rng = random.Random(0)
    rows = []
    for i in range(66):
        label = rng.choice(list(WORDS))
        rows.append({"text": f"the movie was {WORDS[label]} and the story was long {i}", "verdict": label})

    def write_csv(path: Path, part: list[dict], delimiter: str = ",") -> Path:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "verdict"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(part)
        return path

    def write_jsonl(path: Path, part: list[dict]) -> Path:
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        return path

    return {
        "a": write_csv(root / "a.csv", rows[:18]),
        "b": write_csv(root / "b.tsv", rows[18:36], "\t"),
        "c": write_jsonl(root / "c.jsonl", rows[36:54]),
        "test": write_csv(root / "test.csv", rows[54:]),
        "new": write_jsonl(root / "new.jsonl", [{"text": r["text"]} for r in rows[54:]]),
    }


def test_hand_run_on_own_data(tiny_llama, tmp_path):
    files = write_data(tmp_path)
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(TASK))
    assert cli("task", "check", str(task_file)).returncode == 0
    db = tmp_path / "agg.db"
    agg_url = f"http://127.0.0.1:{free_port()}"
    agg_args = ["aggregator", "--port", agg_url.rsplit(":", 1)[1], "--db", str(db), *RUN_FLAGS]
    agg_env = {"FEDBPT_ENROLL_KEY": ENROLL, "FEDBPT_OPERATOR_KEY": OPERATOR}
    operator = {"Authorization": f"Bearer {OPERATOR}"}
    client_env = {"FEDBPT_API_KEY": SVC_KEY, "FEDBPT_ENROLL_KEY": ENROLL}
    clients: dict[str, subprocess.Popen] = {}
    with service(tiny_llama, tmp_path / "service.log") as svc_url:
        aggregator = start(agg_args, tmp_path / "aggregator.log", agg_env)
        try:
            wait_until(lambda: healthy(agg_url), "the aggregator", aggregator, tmp_path / "aggregator.log")

            def client(name: str) -> subprocess.Popen:
                return start(
                    [
                        "client",
                        "--service",
                        svc_url,
                        "--aggregator",
                        agg_url,
                        "--data",
                        str(files[name]),
                        "--task",
                        str(task_file),
                        "--client-id",
                        f"owner-{name}",
                        "--batch-size",
                        "8",
                        "--state-dir",
                        str(tmp_path / "state"),
                        "--retry-for",
                        str(BOUND_S),
                        "--prompt-out",
                        str(tmp_path / f"prompt-{name}.json"),
                    ],
                    tmp_path / f"client-{name}.log",
                    client_env,
                    cwd=tmp_path,
                )

            clients["a"], clients["b"] = client("a"), client("b")
            wait_until(
                lambda: len(httpx.get(f"{agg_url}/v1/status", headers=operator, timeout=5).json()["clients"]) == 2,
                "two registered clients",
                aggregator,
                tmp_path / "aggregator.log",
            )
            # Both now wait for round 0 (it needs three clients): the aggregator goes away under them.
            kill(aggregator)
            aggregator = start(agg_args, tmp_path / "aggregator.log", agg_env)
            wait_until(lambda: healthy(agg_url), "the restarted aggregator", aggregator, tmp_path / "aggregator.log")
            clients["c"] = client("c")
            for name, proc in clients.items():
                assert proc.wait(BOUND_S) == 0, (tmp_path / f"client-{name}.log").read_text()[-3000:]

            for name in ("a", "b"):
                assert "retrying for up to" in (tmp_path / f"client-{name}.log").read_text()
            for name in clients:
                log = (tmp_path / f"client-{name}.log").read_text()
                assert "round 2/2" in log and f"owner-{name} done in" in log and "prompt file:" in log
                prompt = read_prompt(tmp_path / f"prompt-{name}.json")
                assert prompt.z.shape == (8,) and np.isfinite(prompt.z).all()
                assert prompt.task.names == ("neg", "pos", "mid") and prompt.task.label_column == "verdict"
                assert prompt.model == {"name": tiny_llama.name, "hidden_size": 64, "kind": "causal"}
                assert prompt.metrics["rounds_merged"] == 2 and 0 <= prompt.metrics["val_accuracy"] <= 1
                # What is served was chosen on the pooled validation splits of rounds 0 and 1, the read-out's bias
                # fitted on this client's own examples.
                assert prompt.served in ("tuned", "baseline") and prompt.selection["round"] in (0, 1)
                assert prompt.selection["validation"]["examples"] > 0 and prompt.selection["reason"]
                assert prompt.bias is not None and prompt.bias.shape == (3,) and np.isfinite(prompt.bias).all()
            # Every client kept the same global prompt.
            zs = [read_prompt(tmp_path / f"prompt-{name}.json").z for name in clients]
            assert all(np.array_equal(zs[0], z) for z in zs)

            status = cli("status", "--aggregator", agg_url, "--operator-key", OPERATOR)
            assert status.returncode == 0 and "2 rounds merged, 0 failed, of 2" in status.stdout, status
            for source in (["--aggregator", agg_url, "--operator-key", OPERATOR], ["--db", str(db)]):
                out = tmp_path / f"report-{source[0][2:]}"
                done = cli("report", *source, "--out", str(out))
                assert done.returncode == 0, done.stderr
                rounds = list(csv.DictReader(open(out / "rounds.csv")))
                assert [r["state"] for r in rounds] == ["merged", "merged"]
                assert all(int(r["queries"]) > 0 and int(r["bytes_up"]) > 0 for r in rounds)
                per_client = list(csv.DictReader(open(out / "clients.csv")))
                assert sorted({r["client_id"] for r in per_client}) == ["owner-a", "owner-b", "owner-c"]
                assert len(per_client) == 6 and all(int(r["service_bytes_up"]) > 0 for r in per_client)
                assert (out / "accuracy.png").stat().st_size > 5_000
            assert (tmp_path / "report-aggregator" / "clients.csv").read_text() == (
                tmp_path / "report-db" / "clients.csv"
            ).read_text()
        finally:
            for proc in (*clients.values(), aggregator):
                kill(proc)

        # The prompt file alone (and the service) classifies new texts and scores labelled ones.
        prompt_file = str(tmp_path / "prompt-a.json")
        key = {"FEDBPT_API_KEY": SVC_KEY}
        predictions = tmp_path / "predictions.csv"
        done = cli(
            "predict",
            "--prompt",
            prompt_file,
            "--service",
            svc_url,
            "--input",
            str(files["new"]),
            "--output",
            str(predictions),
            env=key,
        )
        assert done.returncode == 0, done.stderr
        rows = list(csv.DictReader(open(predictions)))
        assert len(rows) == 12 and [r["text"] for r in rows] == [
            json.loads(x)["text"] for x in files["new"].read_text().splitlines()
        ]
        for r in rows:
            probs = {name: float(r[f"p_{name}"]) for name in WORDS}
            assert abs(sum(probs.values()) - 1) < 1e-5 and r["prediction"] == max(probs, key=probs.get)

        evaluation = tmp_path / "evaluation.json"
        done = cli(
            "evaluate",
            "--prompt",
            prompt_file,
            "--service",
            svc_url,
            "--data",
            str(files["test"]),
            "--baseline",
            "--output",
            str(evaluation),
            env=key,
        )
        assert done.returncode == 0, done.stderr
        assert "tuned prompt" in done.stdout and "manual prompt (baseline)" in done.stdout
        result = json.loads(evaluation.read_text())
        truth = [r["verdict"] for r in csv.DictReader(open(files["test"]))]
        # The test file holds the same texts as the new one: predict and evaluate must agree exactly (fp32).
        accuracy = np.mean([p["prediction"] == t for p, t in zip(rows, truth)])
        assert result["served"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert result["served_prompt"] == read_prompt(prompt_file).served
        for which in ("served", "tuned", "manual"):
            assert np.array(result[which]["confusion"]).sum() == 12 and 0 <= result[which]["macro_f1"] <= 1


def test_demo_on_own_task_and_data(tiny_llama, tmp_path):
    """`fedbpt demo --task FILE --data FILE`: the demo splits the owner's file into clients and a test set, and
    writes its report and the tuned prompt beside it."""
    files = write_data(tmp_path)
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(TASK))
    done = cli(
        "demo",
        "--task",
        str(task_file),
        "--data",
        str(files["c"]),
        "--model",
        str(tiny_llama),
        "--dtype",
        "float32",
        "--clients",
        "2",
        "--rounds",
        "1",
        "--per-class",
        "0",
        "--intrinsic-dim",
        "4",
        "--prompt-length",
        "1",
        "--local-popsize",
        "3",
        "--local-iterations",
        "1",
        "--batch-size",
        "4",
        "--label-words",
        "",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--name",
        "own",
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "runs" / "own"
    report = json.loads((out / "report.json").read_text())
    # 18 examples: 4 held out (20%, rounded), 14 split between the two clients.
    assert report["test_examples"] == 4 and [r["state"] for r in report["rounds"]] == ["merged"]
    assert report["label_words"] == [" bad", " great", " fine"]
    prompt = read_prompt(out / "prompt.json")
    assert prompt.task.names == ("neg", "pos", "mid") and prompt.z.shape == (4,)
    assert prompt.metrics["tuned_test_accuracy"] == report["tuned_test_accuracy"]
    assert (
        report["served"] == prompt.served and prompt.metrics["served_test_accuracy"] == report["served_test_accuracy"]
    )
