"""Both servers leave out /docs and /redoc (pages that load Swagger UI and ReDoc from a CDN, blank offline) unless
`--docs` asks for them; /openapi.json is served either way. On loopback."""

from __future__ import annotations

import httpx
import pytest

from aggregator.app import create_app as create_aggregator
from fedbpt.cli import build_parser
from fedbpt.loopback import serve_app
from fedbpt_wire.federation import RunConfig
from inference_service.app import create_app as create_service
from inference_service.torch_engine import TorchEngine


@pytest.fixture(scope="module")
def engine(tiny_roberta_dir):
    return TorchEngine(str(tiny_roberta_dir), dtype="float32", device="cpu")


def pages(url: str) -> dict[str, httpx.Response]:
    return {path: httpx.get(f"{url}{path}", timeout=30) for path in ("/docs", "/redoc", "/openapi.json")}


def assert_docs(found: dict[str, httpx.Response], served: bool) -> None:
    assert found["/openapi.json"].status_code == 200 and "paths" in found["/openapi.json"].json()
    for path in ("/docs", "/redoc"):
        assert found[path].status_code == (200 if served else 404)
        if served:
            assert "cdn." in found[path].text and "/openapi.json" in found[path].text


def test_the_service_serves_its_docs_pages_only_when_asked(engine):
    with serve_app(create_service(engine)) as url:
        assert_docs(pages(url), served=False)
    with serve_app(create_service(engine, docs=True)) as url:
        assert_docs(pages(url), served=True)


def test_the_aggregator_serves_its_docs_pages_only_when_asked(tmp_path):
    config = RunConfig(run_id="docs", intrinsic_dim=8, rounds=1, seed=1)
    with serve_app(create_aggregator(config, str(tmp_path / "off.db"))) as url:
        assert_docs(pages(url), served=False)
    with serve_app(create_aggregator(config, str(tmp_path / "on.db"), docs=True)) as url:
        assert_docs(pages(url), served=True)


@pytest.mark.parametrize("command", ["serve", "aggregator"])
def test_docs_is_an_opt_in_flag_that_warns_of_the_cdn(command):
    parser = build_parser()
    assert parser.parse_args([command]).docs is False
    assert parser.parse_args([command, "--docs"]).docs is True
    subcommands = next(a for a in parser._actions if a.dest == "command")
    (docs,) = [a for a in subcommands.choices[command]._actions if a.dest == "docs"]
    assert "CDN" in docs.help
