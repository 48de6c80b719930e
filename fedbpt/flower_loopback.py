"""A whole Flower federation on 127.0.0.1, as real processes: for the tests, the bench and a first try of the app.

SuperLink, SuperNodes and `flwr run` are the installed Flower commands, started in their own process groups and
stopped with everything they started (`stop`). TLS material is made here with `cryptography`: a self-signed
certificate for 127.0.0.1 that is its own CA, and P-384 SuperNode keys in OpenSSH form.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

import fedbpt_flower

from .loopback import free_port
from .selfsigned import self_signed

# The app's manifest for `flwr run`, shipped inside the package (importing the package needs no flwr).
APP_DIR = Path(fedbpt_flower.__file__).resolve().parent / "app"
# Flower's commands start each other by name (the SuperLink its SuperExec, which the ServerApp process): the
# interpreter's own scripts directory goes first on their PATH, where a bare `python -m pytest` has not put it.
BIN = Path(sys.executable).parent


def flower_env(flwr_home: Path) -> dict[str, str]:
    return os.environ | {
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@dataclass(frozen=True)
class Tls:
    ca: Path  # the self-signed certificate, which is also its own CA
    cert: Path
    key: Path


def make_tls(directory: Path) -> Tls:
    cert, key = self_signed(directory, "fedbpt-flower-loopback", stem="superlink")
    return Tls(ca=cert, cert=cert, key=key)


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's (private, public) key files, both in the OpenSSH form `flower-supernode` and
    `flwr supernode register` read."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    directory.mkdir(parents=True, exist_ok=True)
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


class ByteCounter:
    """A TCP relay counting the bytes each way: what travels on a link, TLS and HTTP framing included."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.up = 0  # towards the server
        self.down = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self._server.accept()
            except OSError:
                return
            try:
                outbound = socket.create_connection(self.target)
            except OSError:
                inbound.close()
                continue
            threading.Thread(target=self._pump, args=(inbound, outbound, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(outbound, inbound, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    setattr(self, way, getattr(self, way) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._server.close()


class Processes:
    """Processes started here, each in its own session; `stop` ends them and every process they started."""

    def __init__(self, logdir: Path, env: dict[str, str]):
        self.logdir = logdir
        self.env = env
        self.started: list[subprocess.Popen] = []
        logdir.mkdir(parents=True, exist_ok=True)

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.started.append(proc)
        return proc

    def run(self, name: str, cmd: list[str], timeout: float) -> str:
        """Runs `cmd` to its end; its output, or a one-line error naming the log."""
        path = self.logdir / f"{name}.log"
        with open(path, "wb") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, timeout=timeout)
        out = path.read_text(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} exited with {proc.returncode}; see {path}")
        return out

    def stop(self) -> None:
        # Flower detaches some of its own (the SuperExec runs in a session of its own): collect every descendant
        # before the parents go, then end them all.
        family = []
        for proc in self.started:
            try:
                family += [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in family:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            _, alive = psutil.wait_procs([p for p in map(_process, family) if p is not None], timeout=10)
            family = [p.pid for p in alive]
            if not family:
                break
        for proc in self.started:
            proc.wait(timeout=10)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            name = proc.args if isinstance(proc.args, str) else proc.args[0]  # type: ignore[index]
            raise RuntimeError(f"{name!s} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f} s")


def write_connection(
    flwr_home: Path, address: str, root_cert: Path | None = None, num_supernodes: int | None = None
) -> str:
    """The Flower config file naming one SuperLink connection, `fedbpt`; returns that name."""
    lines = ["[superlink]", 'default = "fedbpt"', "", "[superlink.fedbpt]", f'address = "{address}"']
    lines.append(f'root-certificates = "{root_cert}"' if root_cert else "insecure = true")
    if num_supernodes is not None:
        lines += ["", "[superlink.fedbpt.options]", f"num-supernodes = {num_supernodes}"]
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")
    return "fedbpt"


def run_config_arg(values: dict[str, object]) -> str:
    """`flwr run --run-config` text: TOML values, floats kept floats (the app's config types them)."""

    def toml(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, int):
            return str(v)
        return json.dumps(str(v))

    return " ".join(f"{k}={toml(v)}" for k, v in values.items())


@dataclass
class FlowerRun:
    report: dict  # what the ServerApp wrote (server_app.write_report)
    wall_s: float  # `flwr run` from submission to its end
    link_bytes_up: int  # SuperNodes -> SuperLink, all of them (zero where not counted)
    link_bytes_down: int


def run_deployment(
    workdir: Path,
    run_config: dict[str, object],
    node_configs: list[dict[str, object]],
    *,
    secure: bool = True,
    count_bytes: bool = False,
    timeout: float = 600,
) -> FlowerRun:
    """SuperLink + one SuperNode per node config + `flwr run`; with `secure`, TLS and registered SuperNode keys
    (`--enable-supernode-auth`), as Flower's docs set them up."""
    home = workdir / "flwr-home"
    procs = Processes(workdir / "logs", flower_env(home))
    port = free_port()
    tls = make_tls(workdir / "tls") if secure else None
    link = (
        [
            "--ssl-ca-certfile",
            str(tls.ca),
            "--ssl-certfile",
            str(tls.cert),
            "--ssl-keyfile",
            str(tls.key),
            "--enable-supernode-auth",
        ]
        if tls
        else ["--insecure"]
    )
    counter = None
    try:
        superlink = procs.spawn(
            "superlink",
            [
                "flower-superlink",
                *link,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_for_port(port, superlink)
        conn = write_connection(home, f"127.0.0.1:{port}", tls.ca if tls else None)
        counter = ByteCounter(port) if count_bytes else None
        fleet = counter.port if counter else port
        for i, node in enumerate(node_configs):
            auth = []
            if tls:
                private, public = make_node_key(workdir / "keys", f"node-{i}")
                procs.run(f"register-{i}", ["flwr", "supernode", "register", str(public), conn], timeout=60)
                auth = ["--root-certificates", str(tls.ca), "--auth-supernode-private-key", str(private)]
            procs.spawn(
                f"supernode-{i}",
                [
                    "flower-supernode",
                    *(auth or ["--insecure"]),
                    "--superlink",
                    f"127.0.0.1:{fleet}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    run_config_arg(node),
                ],
            )
        report, wall = flwr_run(procs, workdir, conn, run_config, timeout)
        return FlowerRun(report, wall, counter.up if counter else 0, counter.down if counter else 0)
    finally:
        procs.stop()
        if counter:
            counter.close()


def flwr_run(
    procs: Processes, workdir: Path, conn: str, run_config: dict[str, object], timeout: float
) -> tuple[dict, float]:
    """`flwr run` of the app on connection `conn` to its end: the ServerApp's JSON report and the wall time."""
    report_path = workdir / "report.json"
    values = run_config | {"report": str(report_path)}
    started = time.monotonic()
    procs.run(
        "flwr-run",
        ["flwr", "run", str(APP_DIR), conn, "--stream", "--run-config", run_config_arg(values)],
        timeout=timeout,
    )
    wall = time.monotonic() - started
    if not report_path.exists():
        raise RuntimeError(f"the run ended without its report; see {workdir / 'logs'}")
    return json.loads(report_path.read_text()), wall


def run_simulation(
    workdir: Path, run_config: dict[str, object], num_supernodes: int, timeout: float = 600
) -> FlowerRun:
    """Flower's simulation engine (Ray) behind a local SuperLink started with --simulation, as `flwr run` does
    for a connection with `options.num-supernodes`; its virtual SuperNodes get partition-id and num-partitions."""
    home = workdir / "flwr-home"
    procs = Processes(workdir / "logs", flower_env(home))
    port = free_port()
    try:
        superlink = procs.spawn(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                "--simulation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_for_port(port, superlink)
        conn = write_connection(home, f"127.0.0.1:{port}", num_supernodes=num_supernodes)
        report, wall = flwr_run(procs, workdir, conn, run_config, timeout)
        return FlowerRun(report, wall, 0, 0)
    finally:
        procs.stop()


@dataclass
class NativeRun:
    means: list[list[float]]  # the global mean the aggregator published after each round (float32 wire values)
    status: dict  # GET /v1/status as the operator reads it
    wall_s: float
    link_bytes_up: int  # clients -> aggregator, through the counting relay (zero where not counted)
    link_bytes_down: int


def run_native(
    workdir: Path, service_url: str, service_key: str, config, shards, task, batch_size: int, count_bytes: bool = False
) -> NativeRun:
    """The native aggregator in this process and one `run_client` thread per shard (client-<k>), as
    `fedbpt aggregator` and `fedbpt client --partition k/N` would run them."""
    from aggregator.app import create_app
    from fed_clients.aggregator_client import AggregatorClient
    from fed_clients.service_client import ServiceClient
    from fed_clients.session import run_client
    from fedbpt.loopback import serve_app
    from fedbpt_wire.tensors import decode_tensor

    published: dict[int, list[float]] = {}

    class Watching(AggregatorClient):
        # A round's task carries the global mean the round before it merged into.
        def round(self, wait: float = 0.0):
            t = super().round(wait=wait)
            if t.selected and t.mean is not None and t.round > 0:
                published[t.round - 1] = [float(x) for x in decode_tensor(t.mean)]
            return t

    errors: list[Exception] = []
    workdir.mkdir(parents=True, exist_ok=True)
    with serve_app(
        create_app(config, str(workdir / "native.db"), enroll_key="enroll", operator_key="operator")
    ) as agg_url:
        counter = ByteCounter(int(agg_url.rsplit(":", 1)[1])) if count_bytes else None
        url = f"http://127.0.0.1:{counter.port}" if counter else agg_url

        def work(k: int) -> None:
            service = ServiceClient(service_url, service_key)
            try:
                run_client(
                    service,
                    Watching(url),
                    f"client-{k}",
                    shards[k],
                    task,
                    enroll_key="enroll",
                    batch_size=batch_size,
                    max_idle_s=300,
                    state_dir=workdir / "native-state",
                )
            except Exception as exc:  # reported below, with the others
                errors.append(exc)
            finally:
                service.close()

        started = time.monotonic()
        threads = [threading.Thread(target=work, args=(k,)) for k in range(len(shards))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=900)
        wall = time.monotonic() - started
        if errors or any(t.is_alive() for t in threads):
            raise RuntimeError(f"native run failed: {errors or 'a client did not finish'}")
        operator = AggregatorClient(agg_url)
        operator.http.set_token("operator")
        status = operator.http.request("GET", "/v1/status")
        published[config.rounds - 1] = [float(x) for x in decode_tensor(operator.global_state().mean)]
        if counter:
            counter.close()
    return NativeRun(
        [published[r] for r in range(config.rounds)],
        status,
        wall,
        counter.up if counter else 0,
        counter.down if counter else 0,
    )
