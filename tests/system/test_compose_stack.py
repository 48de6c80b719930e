"""The container stack for real: build the images, run the cpu profile, read the report, resume, tear down.

Needs a Docker engine that answers and Compose v2; skipped otherwise. Marked `docker`, so `make test` (and
CI, which has no engine) deselects it; `make compose-test` runs it. Build settings (package index, torch
source, proxy CA) come from .env when there is one, as for `docker compose build`; the run's settings from
an env file written here: 2 clients, 2 rounds, fresh keys, free ports on 127.0.0.1, and its own project
name and image tag, so a stack of the user's own is left alone. `down -v` removes its containers, network
and volumes; the images stay, so that the next run builds from the cache.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from fedbpt.loopback import free_port

pytestmark = [pytest.mark.docker, pytest.mark.timeout(5400)]

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "fedbpt-compose-test"
CLIENTS, ROUNDS, TEST_SIZE, RUN_ID = 2, 2, 50, "compose-test"
# The run's settings: they override .env and the environment.
RUN_VARS = (
    "FEDBPT_API_KEYS",
    "FEDBPT_API_KEY",
    "FEDBPT_ENROLL_KEY",
    "FEDBPT_OPERATOR_KEY",
    "CLIENTS",
    "ROUNDS",
    "RUN_ID",
    "MODEL",
    "CLIENT_DATA",
    "CLIENT_DATA_DIR",
    "REPORT_TEST_SIZE",
    "SERVICE_PORT",
    "AGGREGATOR_PORT",
    "IMAGE_PREFIX",
    "IMAGE_TAG",
)
# Bounds on each phase, far above what they take on 2 busy CPU cores; not timings under test.
BUILD_S, UP_S, RUN_S, EXIT_S = 3600, 1200, 3600, 600
COSTS = ("queries", "sequences", "tokens", "service_bytes", "bytes_up", "bytes_down")


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
        if info.returncode != 0:
            lines = (info.stderr or info.stdout).strip().splitlines()
            return f"no Docker engine answers (docker info: {lines[-1] if lines else info.returncode})"
        version = subprocess.run(
            ["docker", "compose", "version", "--short"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer within 30 s"
    if version.returncode != 0 or not re.match(r"v?2\.", version.stdout.strip()):
        return "Compose v2 (`docker compose`) is not installed"
    return None


class Stack:
    """`docker compose` on this repository's file with the test's project name, env files and cpu profile."""

    def __init__(self, env_file: Path, log: Path):
        env_files = [ROOT / ".env"] if (ROOT / ".env").is_file() else []
        self.base = [
            "docker",
            "compose",
            "-p",
            PROJECT,
            "-f",
            str(ROOT / "docker-compose.yml"),
            "--project-directory",
            str(ROOT),
            "--progress",
            "plain",
            "--profile",
            "cpu",
        ]
        for path in (*env_files, env_file):
            self.base += ["--env-file", str(path)]
        self.env = {k: v for k, v in os.environ.items() if k not in RUN_VARS and not k.startswith("COMPOSE_")}
        self.log = log

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        with open(self.log, "a") as out:
            out.write(f"\n$ docker compose {' '.join(args)}\n")
            out.flush()
            proc = subprocess.run(
                [*self.base, *args],
                stdout=subprocess.PIPE,
                stderr=out,
                text=True,
                timeout=timeout,
                env=self.env,
                cwd=ROOT,
            )
            out.write(proc.stdout)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} exited {proc.returncode}\n{self.tail()}")
        return proc

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text().splitlines()[-lines:])

    def containers(self) -> list[dict]:
        out = self.run("ps", "-a", "--format", "json").stdout.strip()
        if out.startswith("["):  # Compose before 2.21 prints one array
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def of(self, service: str) -> list[dict]:
        return [c for c in self.containers() if c["Service"] == service]

    def inspect(self, container: str) -> dict:
        out = subprocess.run(["docker", "inspect", container], capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout)[0]

    def logs(self, service: str) -> str:
        return self.run("logs", "--no-color", service, timeout=120).stdout

    def diagnosis(self) -> str:
        return self.run("logs", "--no-color", "--tail", "40", timeout=120, check=False).stdout[-8000:]


def wait_until(what: str, done, timeout: float, stack: Stack, poll_s: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = done()
        if result:
            return result
        time.sleep(poll_s)
    raise AssertionError(f"{what}: not after {timeout:.0f} s\n{stack.diagnosis()}")


def aggregator_status(port: int, operator_key: str | None) -> dict | None:
    headers = {"Authorization": f"Bearer {operator_key}"} if operator_key else {}
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/status", headers=headers, timeout=10).json()
    except httpx.HTTPError:
        return None


def one_shots_exited(stack: Stack, services: tuple[str, ...], count: dict[str, int]) -> list[dict] | None:
    """The containers of `services` once all of them exited, else None; a non-zero exit fails at once."""
    found = [c for c in stack.containers() if c["Service"] in services]
    for c in found:
        if c["State"] == "exited" and c["ExitCode"] != 0:
            raise AssertionError(f"{c['Name']} exited {c['ExitCode']}:\n{stack.logs(c['Service'])[-4000:]}")
    done = [c for c in found if c["State"] == "exited"]
    if all(sum(c["Service"] == s for c in done) == count[s] for s in services):
        return done
    return None


def wait_for_the_run(stack: Stack, port: int) -> dict:
    """Until the aggregator's run is done and every client and the report exited 0 (without a restart)."""
    status = wait_until(
        "the run is done",
        lambda: (s := aggregator_status(port, stack.operator_key)) and s["state"] == "done" and s,
        RUN_S,
        stack,
    )
    exited = wait_until(
        "clients and report exit",
        lambda: one_shots_exited(stack, ("client", "report"), {"client": CLIENTS, "report": 1}),
        EXIT_S,
        stack,
    )
    for c in exited:
        assert stack.inspect(c["ID"])["RestartCount"] == 0, f"{c['Name']} failed and was restarted"
    return status


def healthy(stack: Stack) -> bool:
    states = {c["Service"]: (c["State"], c.get("Health", "")) for c in stack.containers()}
    for service in ("inference-cpu", "aggregator"):
        assert states.get(service, ("missing",))[0] == "running", f"{service}: {states}\n{stack.diagnosis()}"
    return all(states[s] == ("running", "healthy") for s in ("inference-cpu", "aggregator"))


def read_report(stack: Stack, dest: Path) -> dict:
    """The report as docs/docker.md says to fetch it: `docker compose cp report:/reports/. DEST`."""
    stack.run("cp", "report:/reports/.", str(dest))
    assert (dest / RUN_ID / "rounds.csv").is_file()
    return json.loads((dest / RUN_ID / "report.json").read_text())


def check_run(status: dict, report: dict) -> None:
    history = status["history"]
    assert status["state"] == "done" and status["config"]["rounds"] == ROUNDS, status
    assert [r["round"] for r in history] == list(range(ROUNDS))
    assert all(r["state"] == "merged" and len(r["reporters"]) == CLIENTS for r in history), history
    assert len(status["clients"]) == CLIENTS
    for r in history:
        assert 0.0 <= r["val_accuracy"] <= 1.0 and r["val_loss"] > 0, r
        assert all(r[k] > 0 for k in COSTS), r

    assert report["run_id"] == RUN_ID and report["rounds_done"] == ROUNDS
    assert sorted(report["clients"]) == sorted(status["clients"])
    assert [(row["round"], row["val_accuracy"], row["queries"], row["tokens"]) for row in report["rounds"]] == [
        (r["round"], r["val_accuracy"], r["queries"], r["tokens"]) for r in history
    ]
    assert report["totals"] == {k: sum(r[k] for r in history) for k in COSTS}
    assert report["test_examples"] == TEST_SIZE
    assert 0.0 <= report["zero_shot_test_accuracy"] <= 1.0 and 0.0 <= report["tuned_test_accuracy"] <= 1.0
    assert len(report["prompt"]["z"]) == status["config"]["intrinsic_dim"]


def volumes() -> set[str]:
    """This project's volumes."""
    out = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(out.stdout.split())


@pytest.fixture
def stack(tmp_path):
    problem = _engine_problem()
    if problem:
        pytest.skip(f"{problem}: the container stack test needs a Docker engine with Compose v2")
    key, enroll, operator = (secrets.token_urlsafe(24) for _ in range(3))
    settings = {
        "FEDBPT_API_KEYS": key,
        "FEDBPT_API_KEY": key,
        "FEDBPT_ENROLL_KEY": enroll,
        "FEDBPT_OPERATOR_KEY": operator,
        "CLIENTS": CLIENTS,
        "ROUNDS": ROUNDS,
        "RUN_ID": RUN_ID,
        "REPORT_TEST_SIZE": TEST_SIZE,
        "SERVICE_PORT": free_port(),
        "AGGREGATOR_PORT": free_port(),
        "IMAGE_TAG": "compose-test",
    }
    env_file = tmp_path / "stack.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    s = Stack(env_file, tmp_path / "compose.log")
    s.ports = {"service": settings["SERVICE_PORT"], "aggregator": settings["AGGREGATOR_PORT"]}
    s.operator_key = operator
    # A stack left behind by an interrupted run would resume its finished run instead of starting one.
    s.run("down", "-v", "--remove-orphans", timeout=300)
    try:
        yield s
    finally:
        s.run("down", "-v", "--remove-orphans", timeout=300, check=False)
        left = volumes()
        assert not left, f"`down -v` left volumes behind: {sorted(left)}"


def test_the_cpu_stack_builds_runs_reports_and_resumes(stack, tmp_path):
    timings = {}

    def timed(phase: str, action):
        start = time.monotonic()
        result = action()
        timings[phase] = time.monotonic() - start
        print(f"compose-test: {phase} {timings[phase]:.0f} s", flush=True)
        return result

    print(f"\ncompose-test: project {PROJECT}, {CLIENTS} clients, {ROUNDS} rounds; log {stack.log}", flush=True)
    timed("build", lambda: stack.run("build", timeout=BUILD_S))

    # `up -d` returns once the clients started, i.e. once assets completed and both servers are healthy.
    timed(
        "first up to healthy",
        lambda: (stack.run("up", "-d", timeout=UP_S), wait_until("healthy", lambda: healthy(stack), UP_S, stack)),
    )
    assert [c["ExitCode"] for c in stack.of("assets")] == [0]
    # the host ports from the env file, on loopback
    for port in stack.ports.values():
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    first_volumes = volumes()
    assert first_volumes == {f"{PROJECT}_{v}" for v in ("assets", "aggregator-state", "client-state", "reports")}

    status = timed("run and report", lambda: wait_for_the_run(stack, stack.ports["aggregator"]))
    report = read_report(stack, tmp_path / "report-1")
    check_run(status, report)
    # Each replica claimed its own part, under its compose name (docker/compose/replica.py).
    claims = dict(re.findall(r"(\S+) claimed partition (\d+)/", stack.logs("client")))
    assert set(claims) == {f"{PROJECT}-client-{n}" for n in range(1, CLIENTS + 1)}, claims
    assert sorted(claims.values()) == [str(k) for k in range(CLIENTS)], claims
    # /v1/status shows the clients and metrics to the operator key's holder only
    public = aggregator_status(stack.ports["aggregator"], None)
    assert public["redacted"] and not public["clients"], public
    assert all(not r["reporters"] and r["val_accuracy"] is None for r in public["history"]), public
    client_logs = stack.logs("client")
    # Each client's count of its round updates' queries is what the report sums; its total adds the rest.
    counts = re.findall(r"(\d+) service queries \((\d+) in its accepted round updates[^;]*; (\d+) besides", client_logs)
    assert len(counts) == CLIENTS, client_logs[-4000:]
    assert sum(int(rounds) for _, rounds, _ in counts) == report["totals"]["queries"], counts
    assert all(int(total) == int(rounds) + int(rest) and int(rest) > 0 for total, rounds, rest in counts), counts
    # The prompt files are in the reports volume, copied out with the report.
    printed = re.findall(r"prompt file: (\S+)", client_logs)
    assert sorted(printed) == sorted(f"/reports/{RUN_ID}/prompts/{c}.json" for c in status["clients"]), printed
    for c in status["clients"]:
        prompt = json.loads((tmp_path / "report-1" / RUN_ID / "prompts" / f"{c}.json").read_text())
        assert prompt["format"].startswith("fedbpt-prompt/"), prompt
    print(
        f"compose-test: {report['rounds_done']} rounds, validation accuracy "
        f"{[r['val_accuracy'] for r in report['rounds']]}, {report['totals']['queries']} queries, "
        f"{report['totals']['tokens']} tokens; test accuracy zero-shot {report['zero_shot_test_accuracy']:.3f}, "
        f"tuned {report['tuned_test_accuracy']:.3f}",
        flush=True,
    )

    # A second `up` on new containers: the named volumes carry the assets and the finished run.
    stack.run("down", timeout=300)
    assert not stack.containers()
    timed(
        "second up to healthy",
        lambda: (stack.run("up", "-d", timeout=UP_S), wait_until("healthy", lambda: healthy(stack), UP_S, stack)),
    )
    again = timed("second run and report", lambda: wait_for_the_run(stack, stack.ports["aggregator"]))
    assets_log = stack.logs("assets")
    assert "downloading" not in assets_log and "dequantising" not in assets_log, assets_log[-3000:]
    assert volumes() == first_volumes
    # Nothing lost: the same rounds, merges and costs. Only the aggregator link's bytes of the last round may
    # grow: the new replicas' claims, re-registrations and polls after the run ended are metered there.
    link = ("bytes_up", "bytes_down")
    assert [{k: v for k, v in r.items() if k not in link} for r in again["history"]] == [
        {k: v for k, v in r.items() if k not in link} for r in status["history"]
    ]
    assert all(a[k] >= b[k] for a, b in zip(again["history"], status["history"]) for k in link)
    assert sorted(again["clients"]) == sorted(status["clients"])
    assert dict(re.findall(r"(\S+) claimed partition (\d+)/", stack.logs("client"))) == claims, "parts moved"
    second = read_report(stack, tmp_path / "report-2")

    def without_link_bytes(r: dict) -> dict:
        return {
            **r,
            "rounds": [{k: v for k, v in x.items() if k not in link} for x in r["rounds"]],
            "totals": {k: v for k, v in r["totals"].items() if k not in link},
        }

    assert without_link_bytes(second) == without_link_bytes(report), "the report of the resumed run differs"
    assert "the stored report is current" in stack.logs("report"), "the second `up` scored the test split again"
    print("compose-test: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), flush=True)
