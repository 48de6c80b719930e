"""Roles as child processes: spawn one with its log, wait until it answers /healthz, stop it.

One implementation for `fedbpt demo`, `fedbpt bench`, the Python API and the tests that run the real command
line, so a change in how a role starts or reports health is made once; `LoopbackFederation` is the one federated
run on loopback (an aggregator and K clients against a service) they share. The argv builders turn a run's settings into
the same flags a user types, so what the demo and the bench run is what the README documents.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fedbpt_wire.federation import GlobalState, RunStatus

# Clients and the aggregator share the cores with the service; their NumPy work is small, and a BLAS pool
# per process spinning beside the model's threads only slows the model down.
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class ChildFailed(RuntimeError):
    """A child exited (or never became healthy); the message carries the end of its log."""


def log_tail(path: Path | None, chars: int = 2000) -> str:
    if path is None or not path.exists():
        return ""
    return path.read_text(errors="replace")[-chars:]


def spawn(
    argv: list[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    module: str = "fedbpt.cli",
    cwd: str | Path | None = None,
) -> subprocess.Popen:
    """`python -m module argv...` with stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )


def _verify(verify: bool | str) -> bool | ssl.SSLContext:
    return ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify


def wait_healthy(
    url: str,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    timeout: float = 600,
    verify: bool | str = True,
    interval: float = 0.25,
) -> None:
    """Until `url`/healthz answers 200; ChildFailed at once if `proc` exits first, or after `timeout` s."""
    context = _verify(verify)
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ChildFailed(
                f"{url}: the process exited with {proc.returncode} before answering; its log ends:\n{log_tail(log)}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2, verify=context).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise ChildFailed(f"{url} did not answer /healthz within {timeout:.0f} s; the log ends:\n{log_tail(log)}")
        time.sleep(interval)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 30) -> int:
    """Send `sig`, give the process `grace` seconds to exit cleanly, then kill it; its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class Children:
    """Named child processes with their logs under one folder; all stopped on exit, even on Ctrl-C."""

    def __init__(
        self,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        module: str = "fedbpt.cli",
        cwd: str | Path | None = None,
    ):
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.module = module
        self.cwd = cwd
        self.procs: dict[str, subprocess.Popen] = {}

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(
        self, name: str, argv: list[str], env: Mapping[str, str] | None = None, module: str | None = None
    ) -> subprocess.Popen:
        proc = spawn(argv, self.log(name), {**self.env, **(env or {})}, module or self.module, self.cwd)
        self.procs[name] = proc
        return proc

    def start_healthy(
        self,
        name: str,
        argv: list[str],
        url: str,
        env: Mapping[str, str] | None = None,
        timeout: float = 600,
        verify: bool | str = True,
    ) -> subprocess.Popen:
        proc = self.start(name, argv, env)
        self.wait_healthy(name, url, timeout, verify)
        return proc

    def wait_healthy(self, name: str, url: str, timeout: float = 600, verify: bool | str = True) -> None:
        wait_healthy(url, self.procs[name], self.log(name), timeout, verify)

    def check(self) -> None:
        """ChildFailed naming the first child that exited non-zero."""
        for name, proc in self.procs.items():
            if proc.poll() not in (None, 0):
                raise ChildFailed(f"{name} exited with {proc.returncode}; its log ends:\n{log_tail(self.log(name))}")

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 30) -> int:
        return stop(self.procs[name], sig, grace)

    def stop_all(self, sig: int = signal.SIGINT, grace: float = 15) -> None:
        # Signal everyone first, then wait on the shared deadline: N children take `grace`, not N x `grace`.
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def flags(**options: Any) -> list[str]:
    """Keyword arguments as command-line flags: batch_size=16 -> --batch-size 16; None and False are left
    out, True is a bare flag."""
    argv: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def service_argv(port: int, model: str, dtype: str = "auto", **options: Any) -> list[str]:
    return ["serve", *flags(port=port, model=model, dtype=dtype, **options)]


def aggregator_argv(port: int, db: Path, run_config: Mapping[str, Any], **options: Any) -> list[str]:
    """`fedbpt aggregator` for `run_config` (RunConfig fields): written beside the database as the file that
    `--config` reads, so the run's settings are on disk next to its state."""
    settings = dict(run_config)
    run_id = settings.pop("run_id", None)
    path = Path(db).with_suffix(".config.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))
    return ["aggregator", *flags(port=port, db=db, config=path, run_id=run_id, **options)]


def client_argv(service: str, aggregator: str, **options: Any) -> list[str]:
    return ["client", *flags(service=service, aggregator=aggregator, **options)]


def free_url(scheme: str = "http") -> tuple[str, int]:
    from .loopback import free_port

    port = free_port()
    return f"{scheme}://127.0.0.1:{port}", port


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set so far (VmHWM), None once it is gone.

    Read from /proc while it runs: the kernel's rusage for a child also counts the parent's own memory,
    which the child held between fork and exec.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """The highest VmHWM seen of each watched process; VmHWM only grows, so the last reading is the peak."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.peak = [0.0] * len(procs)

    def sample(self) -> None:
        for i, p in enumerate(self.procs):
            value = peak_rss_mb(p.pid)
            if value is not None:
                self.peak[i] = max(self.peak[i], value)


@dataclass
class FederationResult:
    status: RunStatus  # as the operator sees it once the run is done
    final: GlobalState
    # The global mean handed out at the start of each round that was seen open; key `rounds`: the final one.
    means: dict[int, np.ndarray]
    client_peak_rss_mb: list[float]
    client_exit_codes: list[int | None]


class LoopbackFederation:
    """A fresh aggregator and K `fedbpt client` processes against a running service, all on 127.0.0.1 and each
    started with the flags a user types on separate machines; `run` follows the rounds with the operator key and
    returns the final state. The one federation `fedbpt demo`, the bench and the Python API run."""

    def __init__(
        self,
        children: Children,
        db: Path,
        run_config: Mapping[str, Any],
        service_url: str,
        api_key: str,
        clients: list[dict[str, Any]],
        *,
        prefix: str = "",
        enroll_key: str | None = None,
        operator_key: str | None = None,
        poll_s: float = 0.25,
    ):
        self.children = children
        self.db = Path(db)
        self.run_config = dict(run_config)
        self.service_url, self.api_key = service_url, api_key
        self.clients = clients  # each client's own `fedbpt client` options (client_argv keywords)
        self.prefix = prefix
        self.enroll_key = enroll_key or secrets.token_urlsafe(16)
        self.operator_key = operator_key or secrets.token_urlsafe(16)
        self.poll_s = poll_s
        self.url: str | None = None

    def start_aggregator(self) -> str:
        self.url, port = free_url()
        self.children.start_healthy(
            f"{self.prefix}aggregator",
            aggregator_argv(port, self.db, self.run_config),
            self.url,
            env={"FEDBPT_ENROLL_KEY": self.enroll_key, "FEDBPT_OPERATOR_KEY": self.operator_key, **SINGLE_THREADED},
        )
        return self.url

    def run(
        self, on_status: Callable[[RunStatus], None] | None = None, client_exit_s: float | None = None
    ) -> FederationResult:
        """Start the aggregator (unless started) and the clients; poll until the run is done. With
        `client_exit_s`, also wait that long for every client to exit (they fetch the final prompt first)."""
        from fed_clients.aggregator_client import AggregatorClient
        from fedbpt_wire.tensors import decode_tensor

        url = self.url or self.start_aggregator()
        env = {"FEDBPT_API_KEY": self.api_key, "FEDBPT_ENROLL_KEY": self.enroll_key, **SINGLE_THREADED}
        procs = [
            self.children.start(f"{self.prefix}client-{k}", client_argv(self.service_url, url, **options), env=env)
            for k, options in enumerate(self.clients)
        ]
        memory = PeakMemory(procs)
        means: dict[int, np.ndarray] = {}
        rounds = int(self.run_config.get("rounds", 0))
        observer = AggregatorClient(url, timeout=60, token=self.operator_key)
        try:
            while True:
                self.children.check()
                state = observer.global_state()
                if state.state != "waiting":
                    means.setdefault(state.round if state.state == "running" else rounds, decode_tensor(state.mean))
                if on_status is not None:
                    on_status(observer.status())
                memory.sample()
                if state.state == "done":
                    break
                time.sleep(self.poll_s)
            final = observer.global_state()
            status = observer.status()
        finally:
            observer.close()
        codes: list[int | None] = [None] * len(procs)
        if client_exit_s is not None:
            deadline = time.monotonic() + client_exit_s
            for i, p in enumerate(procs):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    codes[i] = p.wait(max(0.1, deadline - time.monotonic()))
        return FederationResult(status, final, means, memory.peak, codes)
