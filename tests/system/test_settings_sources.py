"""One source per setting (issue 25): a RunConfig field, declared once in fedbpt_wire/federation.py, is a flag of
`fedbpt aggregator` and `fedbpt demo` and a key of a bench grid file, with its type, choices and help; nothing
else has to be edited. Checked for every field, so a new one is covered the day it is added."""

from __future__ import annotations

import argparse
import json
import tomllib
import typing
from pathlib import Path

import pytest

from aggregator.cli import add_arguments as aggregator_arguments
from aggregator.cli import config_from_args
from fedbpt.bench.grid import Grid
from fedbpt.demo import DemoConfig, values_from_args
from fedbpt.demo import add_arguments as demo_arguments
from fedbpt_wire.federation import RunConfig
from fedbpt_wire.options import settings_of

FIELDS = [name for name in RunConfig.model_fields if name != "run_id"]


def another_value(name: str):
    """A valid value of the field other than its default."""
    s = settings_of(RunConfig)[name]
    if typing.get_origin(s.annotation) is typing.Literal:
        return next(c for c in reversed(typing.get_args(s.annotation)) if c != s.default)
    if s.annotation is bool:
        return not s.default
    if s.annotation is int:
        return s.default + 1
    return s.default / 2


def as_argv(name: str, value) -> list[str]:
    s = settings_of(RunConfig)[name]
    return [s.options[0]] if s.annotation is bool else [s.options[0], str(value)]


@pytest.mark.parametrize("name", FIELDS)
def test_every_run_config_field_is_an_aggregator_flag(name, tmp_path):
    parser = argparse.ArgumentParser()
    aggregator_arguments(parser)
    action = next(a for a in parser._actions if a.dest == name)
    assert RunConfig.model_fields[name].description, f"{name} needs a description: it is the flag's help"
    assert action.help.startswith(RunConfig.model_fields[name].description.replace("%", "%%"))
    value = another_value(name)
    args = parser.parse_args(["--db", str(tmp_path / "run.db"), *as_argv(name, value)])
    assert getattr(config_from_args(args), name) == value


@pytest.mark.parametrize("name", [n for n in FIELDS if n not in ("min_clients", "projection_seed")])
def test_every_run_config_field_reaches_the_demos_run(name):
    parser = argparse.ArgumentParser()
    demo_arguments(parser)
    value = another_value(name)
    cfg = DemoConfig(**values_from_args(parser.parse_args(as_argv(name, value))))
    assert cfg.run_config()[name] == value


@pytest.mark.parametrize("name", [n for n in FIELDS if n not in ("strategy", "seed", "min_clients")])
def test_every_run_config_field_is_a_grid_file_key(name, tmp_path):
    value = another_value(name)
    path = tmp_path / "grid.json"
    # A grid names the local population `popsize`, as the bench's tables do.
    path.write_text(json.dumps({"name": "g", {"local_popsize": "popsize"}.get(name, name): value}))
    assert Grid.from_file(path).run_config("fedbpt", seed=0, clients=2)[name] == value


# Values the Flower app runs with on purpose: its own run name, and two SuperNodes before round 0 opens.
FLOWER_OWN = {"run_id": "flower", "min_clients": 2}


@pytest.mark.parametrize("name", list(RunConfig.model_fields))
def test_every_run_config_field_is_a_flower_run_config_key_at_its_default(name):
    """Flower lets `flwr run --run-config` set only the keys the app's pyproject declares."""
    manifest = Path(__file__).parents[2] / "fedbpt_flower" / "app" / "pyproject.toml"
    config = tomllib.loads(manifest.read_text())["tool"]["flwr"]["app"]["config"]
    key, expected = name.replace("_", "-"), FLOWER_OWN.get(name, RunConfig.model_fields[name].default)
    assert key in config, f"fedbpt_flower/app/pyproject.toml: add {key} = {expected!r}"
    assert config[key] == expected and type(config[key]) is type(expected)
