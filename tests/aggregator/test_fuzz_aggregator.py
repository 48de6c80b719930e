"""The aggregator fuzzed over loopback HTTP: from its own OpenAPI schema, and with well-formed updates of extreme
values.

Whatever arrives, with or without a valid token, the answer is never a 5xx, and every rejection is a 4xx
whose JSON body carries a readable `detail`.
"""

from __future__ import annotations

import math
import threading

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from aggregator.app import create_app
from aggregator.validation import MAX_METRIC, MAX_SAMPLES
from fedbpt.loopback import serve_app
from fedbpt_wire.federation import RunConfig
from fedbpt_wire.schemas import Tensor
from fedbpt_wire.tensors import decode_tensor, encode_tensor

from ..conftest import assert_no_5xx

D = 8
ENROLL = "sesame"
OPERATIONS = [
    ("POST", "/v1/partitions/claim"),
    ("POST", "/v1/enroll-codes"),
    ("POST", "/v1/clients"),
    ("GET", "/v1/round"),
    ("POST", "/v1/round/update"),
    ("GET", "/v1/global"),
    ("GET", "/v1/status"),
    ("GET", "/v1/report/clients"),
    ("GET", "/healthz"),
]
# Failures are kept in Hypothesis' example database (.hypothesis/, git-ignored) and replayed first on the next
# run; print_blob prints the @reproduce_failure line for a failure seen elsewhere. Every health check is on but
# too_slow, which times data generation by the wall clock: on a shared machine it measures the neighbours.
# deadline=None likewise: an example's duration is loopback HTTP and SQLite commits, no property of the aggregator.
FUZZ = settings(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])


def register(http: httpx.Client, client_id: str) -> str:
    r = http.post(
        "/v1/clients", json={"client_id": client_id, "num_samples": 10}, headers={"Authorization": f"Bearer {ENROLL}"}
    )
    assert r.status_code == 200, r.text
    return r.json()["token"]


def mean_of(payload: dict) -> np.ndarray:
    return decode_tensor(Tensor(**payload))


@pytest.fixture(scope="module")
def aggregator(tmp_path_factory):
    # Long rounds: the run stays open through the fuzzing, so round, update and global see an open round.
    cfg = RunConfig(run_id="fuzz", intrinsic_dim=D, rounds=3, min_clients=2, round_timeout_s=600, seed=5)
    db = tmp_path_factory.mktemp("fuzz") / "run.db"
    with serve_app(create_app(cfg, str(db), enroll_key=ENROLL)) as url, httpx.Client(base_url=url) as http:
        # Ids no generated id is likely to hit: a fuzzed re-registration would retire these tokens.
        tokens = [register(http, cid) for cid in ("fuzz-client-a", "fuzz-client-b")]
        yield url, schemathesis.openapi.from_url(f"{url}/openapi.json"), tokens


@pytest.mark.fuzz
def test_every_operation_is_fuzzed(aggregator):
    _, schema, _ = aggregator
    found = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert found == set(OPERATIONS)


# Negative data only where there is a body to break: a GET's one parameter, an optional header of any
# string, has no schema-invalid value to generate.
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"
]


@pytest.mark.fuzz
@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m}-{p}-{g.value}" for m, p, g in CASES])
def test_schema_fuzz_never_5xx(aggregator, method, path, mode):
    url, schema, tokens = aggregator
    operation = schema[path][method]
    # A generated Authorization header mostly stops at 401; a real token or the enroll key reaches the body checks.
    auth = st.sampled_from([None, f"Bearer {tokens[0]}", f"Bearer {ENROLL}"])

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode), authorization=auth)
    def fuzz(case, authorization):
        headers = {"Authorization": authorization} if authorization else None
        response = case.call(base_url=url, headers=headers, timeout=60)
        assert_no_5xx(response)
        case.validate_response(response, checks=[response_schema_conformance])

    fuzz()


finite = st.floats(allow_nan=False, allow_infinity=False)
# Half the bodies hold values the aggregator should take, at their extremes; the other half may go past every
# bound that matters: its own sanity limits, SQLite's int64, float64's range (an int over ~1.8e308 is no float).
in_bounds = {
    "metric": st.floats(min_value=-MAX_METRIC, max_value=MAX_METRIC),
    "count": st.integers(min_value=0, max_value=MAX_SAMPLES),
}
anything = {"metric": finite, "count": in_bounds["count"] | st.sampled_from([MAX_SAMPLES + 1, 2**63, 2**64, 10**309])}


@st.composite
def updates(draw, round_: int) -> dict:
    """A body the schema accepts: the right shape, any finite values, counts of any size."""
    pick = draw(st.sampled_from([in_bounds, anything]))
    metric, count = pick["metric"], pick["count"]
    mean = draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=D, max_size=D))
    return {
        "round": round_,
        "mean": encode_tensor(np.asarray(mean, dtype=np.float32)).model_dump(),
        "fitness": draw(finite),
        "sigmas": draw(st.lists(st.floats(min_value=1e-300, max_value=1e6), min_size=1, max_size=5)),
        "num_samples": draw(count),
        "metrics": {
            "local_loss": draw(metric),
            "local_accuracy": draw(metric),
            "global_val_loss": draw(st.none() | metric),
            "global_val_accuracy": draw(st.none() | metric),
            "val_samples": draw(count),
        },
        "costs": {k: draw(count) for k in ("queries", "sequences", "tokens", "service_bytes_up", "service_bytes_down")},
    }


def plain(round_: int, **metrics) -> dict:
    return {
        "round": round_,
        "mean": encode_tensor(np.zeros(D, np.float32)).model_dump(),
        "fitness": 1.0,
        "sigmas": [1.0],
        "num_samples": 10,
        "metrics": {
            "local_loss": 0.5,
            "local_accuracy": 0.5,
            "global_val_loss": 0.5,
            "global_val_accuracy": 0.5,
            "val_samples": 10,
            **metrics,
        },
        "costs": dict.fromkeys(("queries", "sequences", "tokens", "service_bytes_up", "service_bytes_down"), 1),
    }


def one_odd_update(**metrics):
    return ((plain(0, **metrics), plain(0)), (plain(1), plain(1)))


@pytest.mark.fuzz
@FUZZ
@given(
    strategy=st.sampled_from(["fedbpt", "fedavg-z", "local-only"]),
    sigma_rule=st.sampled_from(["pooled", "paper-eq6"]),
    bodies=st.tuples(*(st.tuples(updates(r), updates(r)) for r in range(2))),
)
# The folds of a round's metrics at float64's edge: a count no float can hold, a product past the largest float.
@example(strategy="fedbpt", sigma_rule="pooled", bodies=one_odd_update(val_samples=10**309))
@example(
    strategy="fedbpt",
    sigma_rule="pooled",
    bodies=one_odd_update(global_val_accuracy=1.7976931348623157e308, val_samples=MAX_SAMPLES),
)
def test_extreme_updates_never_5xx(tmp_path_factory, strategy, sigma_rule, bodies):
    """Two clients play a whole run with whatever finite numbers they like: merges, status and global never 5xx,
    and a round's validation metrics are finite wherever an accepted update carried them."""
    cfg = RunConfig(
        run_id="extreme",
        intrinsic_dim=D,
        rounds=len(bodies),
        min_clients=2,
        round_timeout_s=600,
        strategy=strategy,
        sigma_rule=sigma_rule,
    )
    db = tmp_path_factory.mktemp("extreme") / "run.db"
    accepted: dict[int, list[dict]] = {}
    with serve_app(create_app(cfg, str(db), enroll_key=ENROLL)) as url, httpx.Client(base_url=url, timeout=60) as http:
        heads = [{"Authorization": f"Bearer {register(http, cid)}"} for cid in ("a", "b")]
        for pair in bodies:
            for h, update in zip(heads, pair):
                assert_no_5xx(http.get("/v1/round", headers=h))
                r = http.post("/v1/round/update", json=update, headers=h)
                assert_no_5xx(r)
                if r.status_code == 200:
                    accepted.setdefault(update["round"], []).append(update["metrics"])
            for h in heads:
                assert_no_5xx(http.get("/v1/global", headers=h))
            status = http.get("/v1/status")
            assert_no_5xx(status)
    for rec in status.json()["history"]:
        for key, field in (("val_accuracy", "global_val_accuracy"), ("val_loss", "global_val_loss")):
            carried = any(m["val_samples"] > 0 and m[field] is not None for m in accepted.get(rec["round"], []))
            assert (rec[key] is not None and math.isfinite(rec[key])) == carried, (key, rec)
        for key in ("sigma_after", "sigma_merged"):
            assert rec[key] is None or math.isfinite(rec[key]), rec


# ---------------------------------------------------------------- tokens: each acts as its own client only


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_acts_only_as_its_own_client(tmp_path):
    cfg = RunConfig(run_id="auth", intrinsic_dim=D, rounds=3, min_clients=2, strategy="local-only", seed=2)
    enroll = {"Authorization": f"Bearer {ENROLL}"}
    operator = {"Authorization": "Bearer operator-only"}
    with (
        serve_app(create_app(cfg, str(tmp_path / "run.db"), enroll_key=ENROLL, operator_key="operator-only")) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        tok = {cid: register(http, cid) for cid in ("a", "b")}
        head = {cid: {"Authorization": f"Bearer {t}"} for cid, t in tok.items()}
        # A client token cannot take over another id by re-registering it, nor create ids, nor claim parts.
        r = http.post("/v1/clients", json={"client_id": "b", "num_samples": 1}, headers=head["a"])
        assert r.status_code == 409 and "already registered" in r.json()["detail"]
        r = http.post("/v1/clients", json={"client_id": "c", "num_samples": 1}, headers=head["a"])
        assert r.status_code == 401 and "enroll key" in r.json()["detail"]
        assert (
            http.post("/v1/partitions/claim", json={"instance": "x", "parts": 2}, headers=head["a"]).status_code == 401
        )
        # Neither the enroll key nor the operator key is a client: no round, no updates.
        for key in (enroll, operator):
            assert http.post("/v1/round/update", json=plain(0), headers=key).status_code == 401

        mine = {"a": plain(0, local_loss=0.1), "b": plain(0, local_loss=0.2)}
        mine["a"]["mean"] = encode_tensor(np.full(D, 0.5, np.float32)).model_dump()
        mine["b"]["mean"] = encode_tensor(np.full(D, -0.5, np.float32)).model_dump()
        for cid in ("a", "b"):
            assert http.post("/v1/round/update", json=mine[cid], headers=head[cid]).status_code == 200
        # local-only: a client's prompt comes from its data alone, so no other client may read it.
        task_b = http.get("/v1/round", headers=head["b"]).json()
        assert task_b["round"] == 1 and mean_of(task_b["mean"]).tolist() == [-0.5] * D
        seen_by_a = http.get("/v1/global", headers=head["a"]).json()["client_means"]
        assert sorted(seen_by_a) == ["a"] and mean_of(seen_by_a["a"]).tolist() == [0.5] * D
        assert sorted(http.get("/v1/global", headers=operator).json()["client_means"]) == ["a", "b"]
        # The enroll key, which every client holds, reads the global distribution but no client's mean.
        assert not http.get("/v1/global", headers=enroll).json()["client_means"]
        # Without the operator key the status names no client and shows no client's metrics.
        public = http.get("/v1/status").json()
        assert public["redacted"] and public["clients"] == [] and public["history"][0]["reporters"] == []
        assert http.get("/v1/status", headers=operator).json()["clients"] == ["a", "b"]

        # A closed round takes nothing more, not even from a client it selected.
        r = http.post("/v1/round/update", json=plain(0, local_loss=0.3), headers=head["b"])
        assert r.status_code == 409 and "already submitted" in r.json()["detail"]

        # Re-registering retires the old token on every endpoint; the new one carries on in the open round.
        again = http.post("/v1/clients", json={"client_id": "a", "num_samples": 10}, headers=head["a"])
        fresh = {"Authorization": f"Bearer {again.json()['token']}"}
        for method, path, payload in (
            ("GET", "/v1/round", None),
            ("GET", "/v1/global", None),
            ("POST", "/v1/round/update", plain(1)),
        ):
            r = http.request(method, path, json=payload, headers=head["a"])
            assert r.status_code == 401 and r.json()["detail"].startswith("Authorization"), (path, r.text)
        assert http.get("/v1/status", headers=operator).json()["history"][1]["reporters"] == []
        assert http.post("/v1/round/update", json=plain(1), headers=fresh).json() == {
            "accepted": True,
            "duplicate": False,
            "round": 1,
        }


def test_a_round_closed_at_its_deadline_refuses_the_late_client(tmp_path):
    clock = Clock()
    cfg = RunConfig(run_id="late", intrinsic_dim=D, rounds=2, min_clients=2, round_timeout_s=10, seed=2)
    with (
        serve_app(create_app(cfg, str(tmp_path / "run.db"), clock=clock)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        head = {cid: {"Authorization": f"Bearer {register(http, cid)}"} for cid in ("a", "b")}
        assert http.post("/v1/round/update", json=plain(0), headers=head["a"]).status_code == 200
        clock.now += 11
        r = http.post("/v1/round/update", json=plain(0), headers=head["b"])
        assert r.status_code == 409 and "not the open round" in r.json()["detail"]
        r0 = http.get("/v1/status").json()["history"][0]
        assert (r0["state"], r0["reporters"]) == ("merged", ["a"])
        # What a client did submit stays answerable as the duplicate it is, after its round closed.
        assert http.post("/v1/round/update", json=plain(0), headers=head["a"]).json()["duplicate"] is True


def race(n: int, send) -> list[httpx.Response]:
    """`send(i)` from n threads released together."""
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def go(i):
        barrier.wait(timeout=60)
        out[i] = send(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in out), "a sender did not finish"
    return out


def test_concurrent_replays_are_accepted_once(tmp_path):
    cfg = RunConfig(run_id="replay", intrinsic_dim=D, rounds=2, min_clients=2, seed=2)
    with serve_app(create_app(cfg, str(tmp_path / "run.db"))) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            head = {cid: {"Authorization": f"Bearer {register(http, cid)}"} for cid in ("a", "b")}

        def post(payload, headers):
            with httpx.Client(base_url=url, timeout=60) as own:
                return own.post("/v1/round/update", json=payload, headers=headers)

        # A client retrying one update over many connections at once: one acceptance, the rest duplicates.
        answers = race(8, lambda i: post(plain(0), head["a"]))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        assert sorted(r.json()["duplicate"] for r in answers) == [False] + [True] * 7
        # Two different updates at once from one client: the first in wins, the other is a conflict.
        answers = race(2, lambda i: post(plain(0, local_loss=0.1 * (i + 1)), head["b"]))
        assert sorted(r.status_code for r in answers) == [200, 409]
        with httpx.Client(base_url=url, timeout=60) as http:
            status = http.get("/v1/status").json()
        assert status["history"][0]["reporters"] == ["a", "b"] and status["round"] == 1
