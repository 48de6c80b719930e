"""`fedbpt serve`'s limit flags are derived from the fields of Limits, and GET /v1/model and its OpenAPI schema
publish those limits from the same fields: one edit of Limits is one flag, one default and one help text."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Literal

import httpx
import pytest

from fedbpt.cli import build_parser
from fedbpt.loopback import serve_app
from fedbpt_wire.schemas import ModelInfo
from inference_service.app import create_app, public_model_info
from inference_service.limits import Limits, limit
from inference_service.server import add_limit_arguments, limits_from
from inference_service.torch_engine import TorchEngine


def serve_parser() -> argparse.ArgumentParser:
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subcommands.choices["serve"]


def test_every_limits_field_is_a_serve_flag_with_its_default_type_and_help():
    actions = {a.dest: a for a in serve_parser()._actions}
    hints = typing.get_type_hints(Limits)
    for f in dataclasses.fields(Limits):
        action = actions[f.name]
        assert action.option_strings == ["--" + f.name.replace("_", "-")]
        assert action.default == f.default
        assert action.type is (float if float in (hints[f.name], *typing.get_args(hints[f.name])) else int)
        assert action.help.startswith(f.metadata["help"])
        # A default is shown; a None default's meaning is written in the help itself.
        assert "default" in action.help
    args = build_parser().parse_args(["serve"])
    assert limits_from(args) == Limits()
    assert not args.docs


def test_a_new_limits_field_needs_no_other_edit_for_its_flag():
    extended = dataclasses.make_dataclass(
        "Extended",
        [
            ("max_widgets", Literal["few", "many"], limit("few", "widgets per request at most")),
            ("max_gizmos", int | None, limit(None, "gizmos at most (default: no cap)")),
        ],
        bases=(Limits,),
        frozen=True,
    )
    parser = argparse.ArgumentParser()
    add_limit_arguments(parser, extended)
    assert limits_from(parser.parse_args([]), extended) == extended()
    parsed = limits_from(parser.parse_args(["--max-widgets", "many", "--max-gizmos", "3"]), extended)
    assert parsed == extended(max_widgets="many", max_gizmos=3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-widgets", "lots"])
    assert "widgets per request at most (default few)" in parser.format_help()


def test_a_field_no_flag_can_take_is_refused_when_the_parser_is_built():
    odd = dataclasses.make_dataclass("Odd", [("max_things", list[int], limit(None, "things"))], frozen=True)
    with pytest.raises(TypeError, match="max_things"):
        add_limit_arguments(argparse.ArgumentParser(), odd)


@pytest.fixture(scope="module")
def engine(tiny_roberta_dir):
    return TorchEngine(str(tiny_roberta_dir), dtype="float32", device="cpu")


def test_the_published_limits_and_their_descriptions_come_from_limits(engine):
    limits = Limits(max_texts=17, max_request_tokens=5000, max_request_seconds=12.5)
    published = [f for f in dataclasses.fields(Limits) if f.name in ModelInfo.model_fields]
    assert {"max_texts", "max_request_tokens", "max_request_seconds"} <= {f.name for f in published}
    with serve_app(create_app(engine, limits=limits)) as url:
        info = httpx.get(f"{url}/v1/model").json()
        schema = httpx.get(f"{url}/openapi.json").json()["components"]["schemas"]["ModelInfo"]["properties"]
    assert info == public_model_info(engine.info, limits).model_dump(mode="json")
    for f in published:
        assert info[f.name] == getattr(limits, f.name)
        assert schema[f.name]["description"] == f.metadata["help"]
