"""Malformed inputs and misconfigured runs, each through the real CLI: one line that names the problem and what to
do, no traceback, exit status 1. The cases that need servers share one tiny-Llama service and one aggregator.
"""

from __future__ import annotations

import json

import pytest

from fedbpt.loopback import free_port

from .test_data_owner import ENROLL, SVC_KEY, TASK, cli, healthy, kill, service, start, wait_until

GOOD_CSV = "text,verdict\nthe movie was great,pos\nthe movie was bad,neg\nit was fine,mid\nso bad,neg\n"

# name -> (files to write, extra client flags, expected fragment of the error line)
DATA_CASES = {
    "jsonl with a bad line": (
        {"d.jsonl": '{"text": "a great film", "verdict": "pos"}\n{"text": "oops", verdict}\n'},
        [],
        "d.jsonl:2: not valid JSON",
    ),
    "jsonl line not an object": (
        {"d.jsonl": '{"text": "a", "verdict": "pos"}\n\n["text"]\n'},
        [],
        "d.jsonl:3: expected a JSON object per line, got list",
    ),
    "csv with an unterminated quote": (
        {"d.csv": 'text,verdict\n"a great film,pos\nbad,neg\n'},
        [],
        "d.csv:2: a quoted field opened here is never closed",
    ),
    "csv with a stray field": (
        {"d.csv": "text,verdict\na,pos\nb,c,neg\n"},
        [],
        "d.csv:3: 3 fields where the header has 2",
    ),
    "label not in the spec": (
        {"d.csv": "text,verdict\na,pos\nb,neutral\n"},
        [],
        "d.csv:3: label 'neutral' is not one of the task's labels (neg, pos, mid or 0..2)",
    ),
    "label column missing": ({"d.csv": "text,label\na,pos\n"}, [], "d.csv:2: no label column 'verdict'"),
    "text column missing": ({"d.jsonl": '{"body": "a", "verdict": "pos"}\n'}, [], "d.jsonl:1: no column 'text'"),
    "one example": ({"d.csv": "text,verdict\na great film,pos\n"}, [], "has 1 example(s); at least 2 are needed"),
    "header only": ({"d.csv": "text,verdict\n"}, [], "d.csv: no examples"),
    "no such data file": ({}, [], "d.csv: no such file or directory"),
    "unknown task": ({"d.csv": GOOD_CSV}, ["--task", "tweets"], "unknown task 'tweets'"),
    "spec without a slot": (
        {"d.csv": GOOD_CSV, "bad-task.json": json.dumps({**TASK, "template": "{text}"})},
        ["--task", "bad-task.json"],
        "must hold {mask} exactly once",
    ),
    "spec with repeated words": (
        {
            "d.csv": GOOD_CSV,
            "bad-task.json": json.dumps({**TASK, "label_words": {"neg": " bad", "pos": " bad", "mid": " fine"}}),
        },
        ["--task", "bad-task.json"],
        "label words must be distinct",
    ),
    "spec not JSON": (
        {"d.csv": GOOD_CSV, "bad-task.json": '{"name": "x",\n "template": }'},
        ["--task", "bad-task.json"],
        "bad-task.json:2: not valid JSON",
    ),
}


def one_error_line(result, command: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"fedbpt {command}: error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def client_args(service_url: str, agg_url: str, *extra: str) -> list[str]:
    flags = [
        "--service",
        service_url,
        "--aggregator",
        agg_url,
        "--data",
        "d.csv",
        "--task",
        "task.json",
        "--client-id",
        "c1",
        "--state-dir",
        "state",
        "--batch-size",
        "2",
    ]
    # A later flag wins in argparse: cases override --data and --task.
    return ["client", *flags, *extra]


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_malformed_inputs_are_one_line_errors(case, tmp_path):
    files, extra, expected = DATA_CASES[case]
    (tmp_path / "task.json").write_text(json.dumps(TASK))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if any(name.endswith(".jsonl") for name in files):
        extra = ["--data", "d.jsonl", *extra]
    # No server listens: every one of these is found before any is contacted.
    dead = f"http://127.0.0.1:{free_port()}"
    line = one_error_line(cli(*client_args(dead, dead, *extra), cwd=tmp_path), "client")
    assert expected in line, line


def test_nonexistent_model_path(tmp_path):
    line = one_error_line(cli("serve", "--model", str(tmp_path / "no" / "model"), "--port", str(free_port())), "serve")
    assert "no such directory" in line and "embedded model" in line, line


def test_not_a_prompt_file(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "in.csv").write_text("text\nhello\n")
    line = one_error_line(
        cli("predict", "--prompt", "p.json", "--service", "http://127.0.0.1:9", "--input", "in.csv", cwd=tmp_path),
        "predict",
    )
    assert "p.json: not a fedbpt-prompt/1 or fedbpt-prompt/2 prompt file" in line, line


def test_service_down_at_start(tmp_path):
    (tmp_path / "task.json").write_text(json.dumps(TASK))
    (tmp_path / "d.csv").write_text(GOOD_CSV)
    dead = f"http://127.0.0.1:{free_port()}"
    line = one_error_line(cli(*client_args(dead, dead), cwd=tmp_path), "client")
    assert f"cannot reach the service at {dead}" in line, line


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from .test_data_owner import build_tiny_llama

    root = tmp_path_factory.mktemp("errors")
    model = build_tiny_llama(root / "llama")
    with service(model, root / "service.log") as svc_url:
        agg_url = f"http://127.0.0.1:{free_port()}"
        agg = start(
            ["aggregator", "--port", agg_url.rsplit(":", 1)[1], "--db", str(root / "agg.db"), "--min-clients", "5"],
            root / "aggregator.log",
            {"FEDBPT_ENROLL_KEY": ENROLL},
        )
        try:
            wait_until(lambda: healthy(agg_url), "the aggregator", agg, root / "aggregator.log")
            yield svc_url, agg_url, model
        finally:
            kill(agg)


SERVER_CASES = {
    "wrong service key": ({"FEDBPT_API_KEY": "nope", "FEDBPT_ENROLL_KEY": ENROLL}, [], "refused the API key (HTTP 401"),
    "wrong enroll key": ({"FEDBPT_API_KEY": SVC_KEY, "FEDBPT_ENROLL_KEY": "nope"}, [], "refused the enroll key"),
    "label word of several tokens": (
        {"FEDBPT_API_KEY": SVC_KEY, "FEDBPT_ENROLL_KEY": ENROLL},
        ["--label-words", " bad, great, wonderful"],
        "cannot use these label words",
    ),
    "aggregator down at start": (
        {"FEDBPT_API_KEY": SVC_KEY, "FEDBPT_ENROLL_KEY": ENROLL},
        ["DEAD_AGGREGATOR"],
        "cannot reach the aggregator",
    ),
}


@pytest.mark.parametrize("case", list(SERVER_CASES))
def test_misconfigured_clients_stop_before_joining(case, servers, tmp_path):
    svc_url, agg_url, _ = servers
    env, extra, expected = SERVER_CASES[case]
    if extra == ["DEAD_AGGREGATOR"]:
        agg_url, extra = f"http://127.0.0.1:{free_port()}", []
    (tmp_path / "task.json").write_text(json.dumps(TASK))
    (tmp_path / "d.csv").write_text(GOOD_CSV)
    line = one_error_line(cli(*client_args(svc_url, agg_url, *extra), env=env, cwd=tmp_path), "client")
    assert expected in line, line


def test_a_run_whose_rounds_all_failed_ends_non_zero(servers, tmp_path):
    svc_url, _, _ = servers
    (tmp_path / "task.json").write_text(json.dumps(TASK))
    (tmp_path / "d.csv").write_text(GOOD_CSV)
    agg_url = f"http://127.0.0.1:{free_port()}"
    # Round 0's deadline passes long before any client can report: it fails, and it is the only round.
    agg = start(
        [
            "aggregator",
            "--port",
            agg_url.rsplit(":", 1)[1],
            "--db",
            str(tmp_path / "agg.db"),
            "--rounds",
            "1",
            "--round-timeout",
            "0.001",
            "--intrinsic-dim",
            "4",
            "--prompt-length",
            "1",
        ],
        tmp_path / "aggregator.log",
    )
    try:
        wait_until(lambda: healthy(agg_url), "the aggregator", agg, tmp_path / "aggregator.log")
        result = cli(*client_args(svc_url, agg_url), env={"FEDBPT_API_KEY": SVC_KEY}, cwd=tmp_path)
        line = one_error_line(result, "client")
        assert "ended with none of its 1 rounds merged" in line, line
        status = cli("status", "--aggregator", agg_url)
        assert status.returncode == 1 and "no round merged" in status.stdout, status
        assert not list(tmp_path.glob("prompt-*.json"))
    finally:
        kill(agg)
    # The aggregator itself, told to stop once the run is done, ends non-zero (here: resuming the finished run).
    again = cli("aggregator", "--port", str(free_port()), "--db", str(tmp_path / "agg.db"), "--exit-when-done", "0")
    assert again.returncode == 1 and "none of its rounds merged" in again.stderr, again.stderr[-2000:]


def test_ca_cert_lets_a_command_trust_a_private_certificate(tmp_path):
    import ssl

    import httpx

    from .test_tls import make_self_signed

    cert, key = make_self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=cert)
    url = f"https://127.0.0.1:{free_port()}"
    agg = start(
        [
            "aggregator",
            "--port",
            url.rsplit(":", 1)[1],
            "--db",
            str(tmp_path / "agg.db"),
            "--ssl-certfile",
            cert,
            "--ssl-keyfile",
            key,
        ],
        tmp_path / "aggregator.log",
    )
    try:
        wait_until(
            lambda: httpx.get(f"{url}/healthz", verify=trust, timeout=2).status_code == 200,
            "the HTTPS aggregator",
            agg,
            tmp_path / "aggregator.log",
        )
        line = one_error_line(cli("status", "--aggregator", url), "status")
        assert "certificate this machine does not trust" in line and "--ca-cert" in line, line
        trusted = cli("status", "--aggregator", url, "--ca-cert", cert)
        assert trusted.returncode == 0 and "waiting for 1 clients" in trusted.stdout, trusted.stderr[-2000:]
    finally:
        kill(agg)
