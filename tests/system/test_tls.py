"""TLS by configuration: both servers speak HTTPS with a certificate given on the command line."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from fed_clients.http import RetryingClient
from fedbpt.launch import Children
from fedbpt.loopback import free_port, serve_app
from fedbpt.selfsigned import self_signed
from fedbpt_wire.tensors import encode_tensor
from inference_service.app import create_app
from inference_service.auth import KeyStore
from inference_service.torch_engine import TorchEngine

REPO = Path(__file__).resolve().parents[2]
KEY = "tls-key"


def make_self_signed(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost, and its private key, as PEM files."""
    cert, key = self_signed(directory, "fedbpt-test")
    return str(cert), str(key)


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[str, str]:
    return make_self_signed(tmp_path_factory.mktemp("tls"))


def trusting(cert_path: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert_path)


def score_body() -> dict:
    return {
        "prompts": encode_tensor(np.zeros((1, 1, 48), np.float32)).model_dump(),
        "texts": ["it was {mask} ."],
        "label_words": [" bad", " great"],
    }


# RetryingClient hands its `verify` path to httpx, which deprecates paths (not yet removed) since 0.28.
@pytest.mark.filterwarnings("ignore:`verify=<str>` is deprecated:DeprecationWarning")
def test_service_over_https_and_not_over_http(tiny_roberta_dir, cert):
    cert_path, key_path = cert
    engine = TorchEngine(str(tiny_roberta_dir), dtype="float32")
    with serve_app(create_app(engine, KeyStore({KEY: None})), ssl_certfile=cert_path, ssl_keyfile=key_path) as url:
        assert url.startswith("https://")
        # The clients' own session, trusting the certificate by its path.
        client = RetryingClient(url, token=KEY, retries=0, verify=cert_path)
        try:
            assert client.request("POST", "/v1/score", score_body())["logits"]["shape"] == [1, 1, 2]
        finally:
            client.close()
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/healthz")  # the system trust store does not know a self-signed certificate
        with pytest.raises(httpx.TransportError):
            httpx.get(url.replace("https://", "http://") + "/healthz", timeout=5)
        assert httpx.get(f"{url}/healthz", verify=trusting(cert_path)).status_code == 200


def test_cli_flags_serve_both_servers_over_https(tiny_roberta_dir, cert, tmp_path):
    cert_path, key_path = cert
    tls = ["--ssl-certfile", cert_path, "--ssl-keyfile", key_path]
    svc_port, agg_port = free_port(), free_port()
    svc, agg = f"https://127.0.0.1:{svc_port}", f"https://127.0.0.1:{agg_port}"
    with Children(tmp_path, cwd=REPO) as procs:
        procs.start(
            "service",
            [
                "serve",
                "--model",
                str(tiny_roberta_dir),
                "--dtype",
                "float32",
                "--device",
                "cpu",
                "--port",
                str(svc_port),
                *tls,
            ],
            env={"FEDBPT_API_KEYS": KEY},
        )
        procs.start(
            "aggregator",
            ["aggregator", "--db", str(tmp_path / "run.db"), "--port", str(agg_port), "--intrinsic-dim", "8", *tls],
        )
        procs.wait_healthy("aggregator", agg, timeout=90, verify=cert_path)
        procs.wait_healthy("service", svc, timeout=90, verify=cert_path)
        r = httpx.post(
            f"{svc}/v1/score", json=score_body(), headers={"Authorization": f"Bearer {KEY}"}, verify=trusting(cert_path)
        )
        assert r.status_code == 200, r.text
        for url in (svc, agg):
            with pytest.raises(httpx.TransportError):
                httpx.get(url.replace("https://", "http://") + "/healthz", timeout=5)


def test_a_key_without_a_certificate_is_refused(tmp_path):
    # `python -m aggregator`, which exits with run()'s status; `fedbpt aggregator` drops it.
    for module, args in (
        ("fedbpt.cli", ["serve", "--ssl-keyfile", "k.pem"]),
        ("aggregator", ["--db", str(tmp_path / "x.db"), "--ssl-keyfile", "k.pem"]),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode != 0 and "--ssl-keyfile needs --ssl-certfile" in proc.stderr + proc.stdout, proc
