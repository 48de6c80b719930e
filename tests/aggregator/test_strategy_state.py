"""A strategy stored as named arrays (aggregator/strategy_state.py) continues bit for bit, and loads without pickle."""

from __future__ import annotations

import pickle
import sqlite3

import numpy as np
import pytest

from aggregator.store import Store
from aggregator.strategies import ClientUpdate, FedAvgZStrategy, FedBPTStrategy, Strategy, make_strategy
from aggregator.strategy_state import dump_strategy, load_strategy
from fedbpt_wire.federation import RunConfig

from .test_aggregator import CLIENTS, live, play, register, run_to_end
from .test_aggregator import config as run_config

D = 6


def cfg(**kw) -> RunConfig:
    return RunConfig(run_id="t", **{"intrinsic_dim": D, "local_popsize": 5, "seed": 11, **kw})


def play_rounds(s: Strategy, sizes: list[int], rng: np.random.Generator) -> Strategy:
    """Rounds of `size` reporters each, their means scattered around the global one."""
    for size in sizes:
        ups = [
            ClientUpdate(f"c{i}", s.mean + rng.normal(size=D) * 0.3, float(rng.random()), list(rng.random(3) + 0.5), i)
            for i in range(size)
        ]
        s.merge(ups)
    return s


def same_strategy(a: Strategy, b: Strategy) -> None:
    np.testing.assert_array_equal(a.mean, b.mean)
    assert a.sigma == b.sigma and a.local_sigma == b.local_sigma
    assert (a.client_means() is None) == (b.client_means() is None)
    for cid, mean in (a.client_means() or {}).items():
        np.testing.assert_array_equal(mean, (b.client_means() or {})[cid])


# popsize 4 and 5 give the global ES a mirrored candidate; rounds of other sizes than round 0's are told with
# other strategy parameters (cma_generation.py); sizes of 1 are told as three identical solutions.
@pytest.mark.parametrize("popsize", [1, 3, 4, 5])
@pytest.mark.parametrize("strategy", ["fedbpt", "fedavg-z", "local-only"])
def test_a_restored_strategy_merges_as_the_one_never_stored(strategy, popsize):
    config = cfg(strategy=strategy, sigma_rule="paper-eq6" if popsize == 3 else "pooled")
    before = [popsize, max(1, popsize - 1), popsize + 2]
    after = [popsize, 1, popsize + 1, popsize]
    straight = play_rounds(make_strategy(config, popsize), before, np.random.default_rng(0))
    restored = load_strategy(
        dump_strategy(play_rounds(make_strategy(config, popsize), before, np.random.default_rng(0)), config), config
    )
    same_strategy(straight, restored)
    np.random.seed(1)  # cma's ask draws from the global RNG: a restored ES must draw as the original does
    asked = straight.es.ask() if isinstance(straight, FedBPTStrategy) else None
    np.random.seed(1)
    if isinstance(restored, FedBPTStrategy):
        np.testing.assert_array_equal(np.asarray(restored.es.ask()), np.asarray(asked))
    play_rounds(straight, after, np.random.default_rng(1))
    play_rounds(restored, after, np.random.default_rng(1))
    same_strategy(straight, restored)
    # Every stored array equal, the ES's covariance, paths and counters included (the bytes are deterministic).
    assert dump_strategy(straight, config) == dump_strategy(restored, config)


def test_a_fresh_strategy_round_trips_before_any_merge():
    config = cfg(strategy="local-only")
    same_strategy(make_strategy(config, 2), load_strategy(dump_strategy(make_strategy(config, 2), config), config))
    fed = make_strategy(cfg(), 3)
    assert dump_strategy(load_strategy(dump_strategy(fed, cfg()), cfg()), cfg()) == dump_strategy(fed, cfg())


def test_loading_never_unpickles(monkeypatch):
    config = cfg()
    blob = dump_strategy(play_rounds(make_strategy(config, 3), [3, 2], np.random.default_rng(0)), config)

    def refused(*args, **kwargs):
        raise AssertionError("pickle used to load the strategy state")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refused)
    restored = load_strategy(blob, config)
    assert isinstance(restored, FedBPTStrategy) and restored.es.countiter == 2


def test_the_state_of_another_strategy_is_refused():
    blob = dump_strategy(make_strategy(cfg(strategy="fedavg-z"), 2), cfg(strategy="fedavg-z"))
    with pytest.raises(ValueError, match="'fedavg-z' run, the run's config says 'fedbpt'"):
        load_strategy(blob, cfg())


def test_a_strategy_pickled_by_the_previous_version_loads_with_its_missing_attributes():
    config = cfg(strategy="fedavg-z", intrinsic_dim=2)
    old = FedAvgZStrategy(config, popsize=2)
    del old.robust, old.popsize  # attributes added after such pickles were written
    loaded = load_strategy(pickle.dumps(old), config)
    assert isinstance(loaded, FedAvgZStrategy) and loaded.robust == "none" and loaded.popsize == 1
    a = ClientUpdate("a", np.zeros(2), 1.0, [0.5], 1)
    b = ClientUpdate("b", np.array([3.0, 6.0]), 1.0, [1.0], 2)
    loaded.merge([a, b])
    np.testing.assert_allclose(loaded.mean, [2.0, 4.0])  # weighted by samples, as before robust merging
    same_strategy(load_strategy(dump_strategy(loaded, config), config), loaded)


def test_a_database_of_the_previous_version_resumes_as_an_uninterrupted_run(tmp_path):
    """A run stopped mid-round by the previous version, whose database holds the strategy pickled, ends as the
    same run never stopped; from its next merge on the state is stored as arrays."""
    cfg3 = run_config(min_clients=3, rounds=3)
    with live(cfg3, tmp_path / "straight.db") as http:
        heads = {cid: register(http, cid) for cid in CLIENTS}
        straight = run_to_end(http, heads)

    db = tmp_path / "old.db"
    with live(cfg3, db) as http:
        heads = {cid: register(http, cid) for cid in CLIENTS}
        for k, cid in enumerate(CLIENTS):
            play(http, cid, k, heads[cid])
        play(http, "a", 0, heads["a"])  # round 1, one of three
    store = Store(str(db))
    blob = store.load_strategy()
    assert blob is not None
    store.save_strategy(pickle.dumps(load_strategy(blob, cfg3)))  # what the previous version stored
    store.close()

    with live(cfg3, db) as http:
        restarted = run_to_end(http, heads)
    assert restarted["global"]["mean"] == straight["global"]["mean"]
    assert restarted["global"]["sigma"] == straight["global"]["sigma"]
    keys = ("state", "reporters", "sigma_before", "sigma_merged", "sigma_after", "local_sigma")
    assert [{k: r[k] for k in keys} for r in restarted["history"]] == [
        {k: r[k] for k in keys} for r in straight["history"]
    ]
    with sqlite3.connect(db) as conn:
        (state,) = conn.execute("SELECT state FROM strategy").fetchone()
    assert bytes(state).startswith(b"PK")  # an npz archive now
