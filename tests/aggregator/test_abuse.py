"""What one client's credentials can do to the aggregator, and no more (issue 11): identities, merges, leaks, meters.

Real aggregator app under uvicorn on 127.0.0.1, real cma, real SQLite; the attacker is an httpx client holding
what a client holds (the enroll key and its own token).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator.app import create_app
from aggregator.strategies import (
    SIGMA_CLIP,
    SIGMA_MAX_RATIO,
    ClientUpdate,
    bound_updates,
    make_strategy,
    merge_round,
    robust_average,
    sigma_bound,
)
from fed_clients.aggregator_client import AggregatorClient
from fed_clients.credentials import TokenFile
from fed_clients.http import RequestFailed
from fedbpt.loopback import serve_app
from fedbpt_wire.federation import ClientCosts, ClientMetrics, RunConfig, UpdateRequest
from fedbpt_wire.tensors import encode_tensor

from .test_aggregator import D, body, config, live, mean_of, play, register, wait_for

OPERATOR = {"Authorization": "Bearer the-operator"}


def _round_of_three(http, poisoned: dict, **honest_kw) -> tuple[np.ndarray, np.ndarray, dict]:
    """Round 0 with honest a and b and the attacker c; returns (mean before, mean after, round 0's record)."""
    heads = {cid: register(http, cid, n=10) for cid in ("a", "b", "c")}
    task = http.get("/v1/round", headers=heads["a"]).json()
    before = mean_of(task["mean"])
    rng = np.random.default_rng(0)
    for cid in ("a", "b"):
        step = rng.standard_normal(D) * 0.3
        assert (
            http.post(
                "/v1/round/update", json=body(0, before + step, fitness=0.5, **honest_kw), headers=heads[cid]
            ).status_code
            == 200
        )
    assert http.post("/v1/round/update", json=poisoned, headers=heads["c"]).status_code == 200
    after = mean_of(http.get("/v1/global", headers=heads["a"]).json()["mean"])
    (r0, *_) = http.get("/v1/status", headers=OPERATOR).json()["history"]
    return before, after, r0


@pytest.mark.parametrize("strategy", ["fedbpt", "fedavg-z"])
def test_one_poisoned_update_of_three_moves_the_global_mean_at_most_the_clip(tmp_path, strategy):
    far = np.full(D, 1e3)
    poisoned = body(0, far, fitness=-1e9, sigmas=(1e5, 1e5), n=10**12)
    bound = 4.0 * 1.0 * math.sqrt(D)  # clip_multiple x sigma0 x sqrt(d), the documented radius
    cfg = config(strategy=strategy, min_clients=3, rounds=2)
    with live(cfg, tmp_path / "run.db", operator_key="the-operator") as http:
        before, after, r0 = _round_of_three(http, poisoned)
        sigma = http.get("/v1/global", headers=OPERATOR).json()["sigma"]
    assert np.linalg.norm(after - before) <= bound + 1e-6
    assert r0["clipped"] == 1 and r0["state"] == "merged"
    assert sigma <= SIGMA_CLIP * 1.0 + 1e-9  # local step sizes of 1e5 do not carry into the global one

    # The same round with clipping off moves it past that radius (pycma repairs far "injected" solutions to a
    # Mahalanobis length of its own, which bounds FedBPT's shift somewhat; fedavg-z follows the attacker).
    with live(
        config(strategy=strategy, min_clients=3, rounds=2, clip_multiple=0, max_weight_ratio=1e12),
        tmp_path / "open.db",
        operator_key="the-operator",
    ) as http:
        before, after, r0 = _round_of_three(http, poisoned)
    assert np.linalg.norm(after - before) > (1 if strategy == "fedbpt" else 100) * bound


def test_robust_fedavg_z_ignores_one_outlier_coordinate(tmp_path):
    outlier = np.zeros(D)
    outlier[0] = 0.9  # inside the clip radius: only the median stops it
    cfg = config(strategy="fedavg-z", min_clients=3, rounds=2, robust_merge="median")
    with live(cfg, tmp_path / "run.db", operator_key="the-operator") as http:
        heads = {cid: register(http, cid) for cid in ("a", "b", "c")}
        means = {"a": np.full(D, 0.1), "b": np.full(D, 0.2), "c": outlier}
        for cid, h in heads.items():
            assert http.post("/v1/round/update", json=body(0, means[cid]), headers=h).status_code == 200
        merged = mean_of(http.get("/v1/global", headers=heads["a"]).json()["mean"])
    np.testing.assert_allclose(merged, np.median(np.stack(list(means.values())), axis=0), atol=1e-6)
    assert merged[0] == pytest.approx(0.2, abs=1e-6)


def test_bound_updates_by_hand():
    center = np.zeros(4)
    ups = [
        ClientUpdate("a", np.array([3.0, 4.0, 0, 0]), 0.1, [0.5, 30.0], 10, 25.0),
        ClientUpdate("b", np.array([0.1, 0, 0, 0]), 0.2, [0.5], 10),
        ClientUpdate("c", np.array([0.0, 0, 0, 0]), 0.3, [0.5], 1000),
    ]
    # radius 1 x min(0.5, sigma0 1) x sqrt(4) = 1; sigma cap 10 x max(0.5, 1.0) = 10; median n = 10, n cap 20
    out, changed = bound_updates(
        ups, center, sigma=0.5, local_sigma=1.0, clip_multiple=1.0, max_weight_ratio=2.0, sigma0=1.0
    )
    np.testing.assert_allclose(out[0].mean, [0.6, 0.8, 0, 0])
    assert out[0].sigmas == [0.5, 10.0] and out[0].final_sigma == 10.0
    assert out[1].mean.tolist() == [0.1, 0, 0, 0] and out[1].sigmas == [0.5] and out[1].num_samples == 10
    assert out[2].num_samples == 20 and changed == 2


def test_a_new_ids_update_is_bounded_tighter_by_hand():
    center = np.zeros(4)
    ups = [ClientUpdate(cid, np.full(4, 10.0), 0.0, [50.0, 0.5], 10, 50.0) for cid in ("old", "new")]
    out, changed = bound_updates(ups, center, 1.0, 0.5, 4.0, 4.0, 1.0, newcomers={"new"}, newcomer_clip=0.25)
    old, new = out
    assert changed == 2
    assert np.linalg.norm(old.mean) == pytest.approx(4.0 * 2) and np.linalg.norm(new.mean) == pytest.approx(2.0)
    assert old.sigmas == [SIGMA_CLIP * 1.0, 0.5] and new.sigmas == [1.0, 0.5] and new.final_sigma == 1.0


def test_the_clip_radius_never_grows_past_sigma0s():
    # A global step size the clients inflated to 50 leaves the radius at clip_multiple x sigma0 x sqrt(d).
    far = [ClientUpdate("a", np.array([100.0, 0, 0, 0]), 0.1, [1.0], 10)]
    out, _ = bound_updates(
        far, np.zeros(4), sigma=50.0, local_sigma=50.0, clip_multiple=1.0, max_weight_ratio=2.0, sigma0=1.0
    )
    np.testing.assert_allclose(out[0].mean, [2.0, 0, 0, 0])


@pytest.mark.parametrize("strategy", ["fedbpt", "fedavg-z"])
def test_one_client_cannot_inflate_sigma_or_drag_the_mean_over_rounds(strategy):
    """The probe of issue 24: one of three clients sends step sizes at the cap of each round and a mean far off,
    round after round. Before the run bounded sigma it compounded (1 -> 6.6 -> 43 -> 290 -> 1979) and the mean
    followed (14.8 -> 113 -> 761 -> 5110); now sigma grows at most x2 a round up to 4 x sigma0, and each round
    moves the mean by at most clip_multiple x sigma0 x sqrt(d)."""
    d, rounds = 50, 6
    cfg = RunConfig(run_id="probe", strategy=strategy, intrinsic_dim=d, local_iterations=2, local_popsize=8)
    state = make_strategy(cfg, popsize=3)
    radius = cfg.clip_multiple * cfg.sigma0 * np.sqrt(d)
    sigmas, norms = [], []
    for r in range(rounds):
        cap = SIGMA_CLIP * max(state.sigma, state.local_sigma or 0.0)
        honest = [(f"h{k}", update_request(r, state.mean + 0.01 * (k + 1), [0.9 * state.sigma] * 2)) for k in range(2)]
        attacker = ("x", update_request(r, state.mean + 1e6, [cap, cap]))
        before = state.mean.copy()
        merge_round(state, sorted([*honest, attacker]), cfg)
        assert np.linalg.norm(state.mean - before) <= radius + 1e-9
        sigmas.append(state.sigma)
        norms.append(float(np.linalg.norm(state.mean)))
    assert max(sigmas) <= SIGMA_MAX_RATIO * cfg.sigma0 + 1e-12
    assert all(b <= 2 * a + 1e-12 for a, b in zip([cfg.sigma0, *sigmas], sigmas))
    assert norms[-1] <= rounds * radius


def update_request(round_: int, mean: np.ndarray, sigmas: list[float]) -> UpdateRequest:
    return UpdateRequest(
        round=round_,
        mean=encode_tensor(np.asarray(mean, dtype=np.float32)),
        fitness=0.5,
        sigmas=sigmas,
        num_samples=10,
        metrics=ClientMetrics(local_loss=0.5, local_accuracy=0.5),
        costs=ClientCosts(queries=1, sequences=1, tokens=1, service_bytes_up=1, service_bytes_down=1),
    )


def test_more_step_sizes_than_local_iterations_are_refused(tmp_path):
    with live(config(min_clients=1, local_iterations=2), tmp_path / "run.db") as http:
        h = register(http, "a")
        r = http.post("/v1/round/update", json=body(0, np.zeros(D), sigmas=[0.9] * 3), headers=h)
        assert r.status_code == 422 and "sigmas" in r.json()["detail"] and "local_iterations" in r.json()["detail"]


def test_robust_average_by_hand():
    rows = np.array([[1.0, 10.0], [2.0, -50.0], [3.0, 20.0], [100.0, 30.0], [4.0, 40.0]])
    assert robust_average(rows, "median").tolist() == [3.0, 20.0]
    # m = 5 drops max(1, 5 // 5) = 1 row at each end, per coordinate: [2, 3, 4] and [10, 20, 30]
    assert robust_average(rows, "trimmed-mean").tolist() == [3.0, 20.0]
    assert robust_average(rows[:2], "trimmed-mean").tolist() == [1.5, -20.0]


def test_registration_is_capped_and_costs_are_bounded(tmp_path):
    with live(config(min_clients=1), tmp_path / "run.db", max_clients=2) as http:
        h = register(http, "a")
        register(http, "b")
        r = http.post("/v1/clients", json={"client_id": "c", "num_samples": 1})
        assert r.status_code == 409 and "registration is closed" in r.json()["detail"]
        huge = body(0, np.zeros(D))
        huge["costs"]["tokens"] = 10**400
        r = http.post("/v1/round/update", json=huge, headers=h)
        assert r.status_code == 422 and "costs.tokens" in r.json()["detail"]


def test_a_restarted_client_rebinds_its_own_id_from_its_token_file(tmp_path):
    cfg = config(min_clients=2)
    with serve_app(create_app(cfg, str(tmp_path / "run.db"), enroll_key="join")) as url:
        saved = TokenFile(tmp_path / "state", url, "a")
        first = AggregatorClient(url)
        reg = first.register("a", 10, "join", token=saved.read())
        saved.write(reg.token)
        assert saved.path.stat().st_mode & 0o077 == 0  # the owner's alone
        # The restarted process finds its token and re-binds "a"; the old token is retired.
        again = AggregatorClient(url)
        rebound = again.register("a", 10, "join", token=saved.read())
        assert rebound.token != reg.token
        assert again.round().state == "waiting"
        with pytest.raises(RequestFailed) as retired:
            first.round()
        assert retired.value.status == 401 and "takes a client token" in retired.value.detail
        # Without that file, the enroll key alone cannot take "a" over.
        with pytest.raises(RequestFailed) as taken:
            AggregatorClient(url).register("a", 10, "join")
        assert taken.value.status == 409 and "already registered" in taken.value.detail
        for c in (first, again):
            c.close()


def _late_sybils(http, n_sybils: int) -> tuple[np.ndarray, np.ndarray, dict, float]:
    """Honest a, b, c start the run; n_sybils ids register once round 0 is open and, in round 1, all report a
    far mean with the best fitness and huge step sizes while the honest clients report the mean they were handed.
    Returns (round 1's mean, the mean after it, round 1's record, sigma after)."""
    honest = {cid: register(http, cid) for cid in ("a", "b", "c")}
    assert http.get("/v1/round", headers=honest["a"]).json()["state"] == "open"
    sybils = {f"s{i}": register(http, f"s{i}") for i in range(n_sybils)}
    handed = mean_of(http.get("/v1/round", headers=honest["a"]).json()["mean"])
    for heads in honest.values():
        assert http.post("/v1/round/update", json=body(0, handed), headers=heads).status_code == 200
    task = http.get("/v1/round", headers=honest["a"]).json()
    assert task["round"] == 1 and task["state"] == "open", task
    before = mean_of(task["mean"])
    for heads in honest.values():
        assert http.post("/v1/round/update", json=body(1, before), headers=heads).status_code == 200
    far = before + 1e3
    for heads in sybils.values():
        r = http.post("/v1/round/update", json=body(1, far, fitness=-1e9, sigmas=(1e5, 1e5)), headers=heads)
        assert r.status_code == 200, r.text
    state = http.get("/v1/global", headers=OPERATOR).json()
    r1 = http.get("/v1/status", headers=OPERATOR).json()["history"][1]
    return before, mean_of(state["mean"]), r1, state["sigma"]


@pytest.mark.parametrize("strategy", ["fedbpt", "fedavg-z"])
def test_ids_that_join_late_move_the_mean_at_most_the_newcomer_share_however_many(tmp_path, strategy):
    """Issue 24: 20 Sybil ids beside 3 honest clients moved the mean the whole clip radius in a round. Ids that
    register after round 0 opened are new for their first newcomer_rounds reported rounds: together they pull the
    mean at most newcomer_clip x the radius, and their step sizes do not raise the global one."""
    cfg = config(strategy=strategy, min_clients=3, rounds=3, newcomer_clip=0.25)
    with live(cfg, tmp_path / "run.db", operator_key="the-operator") as http:
        before, after, r1, sigma = _late_sybils(http, 20)
    radius = cfg.clip_multiple * min(r1["sigma_before"], cfg.sigma0) * math.sqrt(D)
    moved = float(np.linalg.norm(after - before))
    assert 0 < moved <= 0.25 * radius + 1e-6, (moved, radius)
    assert r1["clipped"] == 20 and r1["state"] == "merged"
    assert sigma <= sigma_bound(r1["sigma_before"], cfg.sigma0) + 1e-9

    # Without the newcomer bound the same 20 ids pull the mean past that share, towards the whole radius.
    with live(
        config(strategy=strategy, min_clients=3, rounds=3, newcomer_rounds=0),
        tmp_path / "open.db",
        operator_key="the-operator",
    ) as http:
        before, after, r1, _ = _late_sybils(http, 20)
    assert float(np.linalg.norm(after - before)) > 0.5 * radius


def test_founders_and_ids_that_have_reported_are_not_new(tmp_path):
    """The bound is for new ids only: a founder re-registering after a restart, and a late id once it has reported
    in newcomer_rounds merged rounds, are bounded as everyone else."""
    from aggregator.store import Store

    cfg = config(min_clients=2, rounds=4, newcomer_rounds=1)
    with live(cfg, tmp_path / "run.db", operator_key="the-operator") as http:
        heads = {cid: register(http, cid) for cid in ("a", "b")}
        late = register(http, "late")
        heads["a"] = register(http, "a", key="the-operator")  # a founder registered again: the operator re-binds it
        store = Store(str(tmp_path / "run.db"))
        try:
            assert store.newcomers(1, 1) == {"late"}
            for cid, h in heads.items():
                play(http, cid, 0, h)
            wait_for(lambda: http.get("/v1/round", headers=late).json()["round"] == 1, what="round 1")
            for k, (cid, h) in enumerate({**heads, "late": late}.items()):
                play(http, cid, k, h)
            wait_for(lambda: http.get("/v1/round", headers=late).json()["round"] == 2, what="round 2")
            assert store.newcomers(1, 1) == {"late"}  # before round 1 it had reported in no merged round
            assert store.newcomers(2, 1) == set()  # round 1 merged with its update
        finally:
            store.close()
