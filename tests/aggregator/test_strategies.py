"""The merge math of aggregator/strategies.py against values computed by hand."""

from __future__ import annotations

import math
import pickle

import cma
import numpy as np
import pytest
from cma.recombination_weights import RecombinationWeights
from cma.sigma_adaptation import CMAAdaptSigmaCSA

from aggregator.cma_generation import tell_generation
from aggregator.strategies import (
    STRATEGY_CLASSES,
    ClientUpdate,
    FedAvgZStrategy,
    FedBPTStrategy,
    LocalOnlyStrategy,
    Strategy,
    make_strategy,
    next_local_sigma,
    paper_eq6_sigma,
    pooled_sigma,
)
from fedbpt_wire.federation import STRATEGIES, RunConfig


def cfg(**kw) -> RunConfig:
    return RunConfig(run_id="t", **{"intrinsic_dim": 4, "local_popsize": 5, **kw})


def up(cid: str, mean, fitness=1.0, sigmas=(1.0,), n=1) -> ClientUpdate:
    return ClientUpdate(cid, np.asarray(mean, dtype=float), fitness, list(sigmas), n)


def test_pooled_sigma_by_hand():
    assert RecombinationWeights(5).mu == 2  # the local parent count at local popsize 5
    # sum of squares 1 + 0.25 + 0.25 + 0.25 = 1.75, over m = 2 clients and mu_local = 2
    assert pooled_sigma([[1.0, 0.5], [0.5, 0.5]], local_popsize=5) == pytest.approx(math.sqrt(0.4375))


def test_paper_eq6_sigma_by_hand():
    sigmas = [[1.0, 0.5], [0.5, 0.5], [2.0]]  # squares summed: 1.25, 0.5, 4.0
    fitnesses = [0.1, 0.9, 0.5]  # best half of 3 (rounded up): clients 0 and 2 -> 5.25
    # 2 * sqrt(5.25 / (3 * 5)) = 2 * sqrt(0.35)
    assert paper_eq6_sigma(sigmas, fitnesses, local_popsize=5) == pytest.approx(2 * math.sqrt(0.35))
    assert paper_eq6_sigma([[0.5]], [3.0], local_popsize=5) == pytest.approx(2 * math.sqrt(0.25 / 5))


def test_local_sigma_follows_the_global_ratio_clipped():
    assert next_local_sigma(1.0, before=2.0, after=1.4, floor=0.5) == pytest.approx(0.7)
    assert next_local_sigma(1.0, before=2.0, after=2.6, floor=0.5) == 1.0  # never grows
    assert next_local_sigma(1.0, before=2.0, after=0.6, floor=0.5) == 0.5  # floor
    assert next_local_sigma(0.3, before=2.0, after=1.0, floor=0.5) == 0.3  # under the floor already: stays


def _csa_step_by_hand(n: int, sampled: int, ranked_means: list[np.ndarray], sigma: float) -> tuple[np.ndarray, float]:
    """The mean and step size of pycma 4's first tell with CSA, from its formulas, for a global ES of dimension n
    built for `sampled` clients (CMA_mu = popsize) and told the reporters' means best first.

    Weights: w_i ~ ln((2 mu + 1) / 2) - ln(i) for i <= mu, normalised, mu = number told (cma's positive
    recombination weights of popsize 2 mu); mu_eff = 1 / sum w_i^2. Mean: sum w_i x_i (c_mean = 1).
    Path: p_s = sqrt(c_s (2 - c_s)) sqrt(mu_eff) C^-1/2 (m' - m) / sigma, from p_s = 0, where pycma starts from
    C = diag(exp(1e-4 / n * i)) "to prevent equal eigenvalues". Step: sigma' = sigma exp(c_s / d_s (|p_s| / chi_n - 1)),
    chi_n = sqrt(2) Gamma((n + 1) / 2) / Gamma(n / 2). Both constants are set when the ES is built, from the
    mu0_eff of its own popsize lam: c_s = (mu0_eff + 2) / (n + mu0_eff + 3) and
    d_s = 0.5 + min(1, (lam_mirr / (0.159 lam) - 1)^2) / 2 + 2 max(0, d_in sqrt((mu0_eff - 1) / (n + 1)) - 1) + c_s
    with d_in = max(1, 3 (1 - 0.5^(n / 9))). For n = 4 and lam <= 3 (lam_mirr 0 or 1) the min is 1 and the max 0,
    so d_s = 1 + c_s.
    """

    def weights(mu: int) -> np.ndarray:
        w = np.array([math.log((2 * mu + 1) / 2) - math.log(i) for i in range(1, mu + 1)])
        return w / w.sum()

    w = weights(len(ranked_means))
    mu_eff, mu0_eff = 1 / np.sum(w**2), 1 / np.sum(weights(sampled) ** 2)
    mean = sum(wi * x for wi, x in zip(w, ranked_means))
    c_s = (mu0_eff + 2) / (n + mu0_eff + 3)
    d_s = 1 + c_s
    c_inv_sqrt = np.exp(-0.5e-4 / n * np.arange(n))
    p_s = math.sqrt(c_s * (2 - c_s)) * math.sqrt(mu_eff) * c_inv_sqrt * mean / sigma
    chi_n = math.sqrt(2) * math.gamma((n + 1) / 2) / math.gamma(n / 2)
    return mean, sigma * math.exp(c_s / d_s * (np.linalg.norm(p_s) / chi_n - 1))


@pytest.mark.parametrize("sampled", [2, 3], ids=["all-reported", "one-of-three-missing"])
def test_fedbpt_merge_step_sizes_by_hand(sampled):
    """Round 0 of FedBPT (pooled rule, local popsize 5, floor 0.5): the step size the rule sets, the global ES's
    step size after the tell, and the local one derived from them, each computed here from the formulas."""
    s = FedBPTStrategy(cfg(), popsize=sampled)
    a = up("a", [0.3, -0.2, 0.0, 0.1], fitness=0.2, sigmas=[0.9, 0.7])
    b = up("b", [0.0, 0.4, 0.1, 0.0], fitness=0.6, sigmas=[0.8, 0.6])
    r = s.merge([b, a])
    # Pooled: sqrt((0.81 + 0.49 + 0.64 + 0.36) / m / mu_local), m = 2 reporters, mu_local = floor(5 / 2) = 2.
    merged = math.sqrt(2.30 / 2 / 2)
    mean, after = _csa_step_by_hand(4, sampled, [a.mean, b.mean], merged)
    assert r.sigma_merged == pytest.approx(merged, rel=1e-15)
    np.testing.assert_allclose(s.mean, mean, rtol=0, atol=1e-15)
    assert r.sigma_after == s.sigma == pytest.approx(after, rel=1e-12)
    # The local step size follows the global one's ratio, from sigma0 = 1, clipped to [floor 0.5, 1].
    assert 0.5 < after / merged < 1
    assert s.local_sigma == pytest.approx(after / merged, rel=1e-12)
    assert s.local_start("a").local_sigma == s.local_sigma and s.local_start("a").sigma == s.sigma


def test_a_mean_far_outside_the_global_distribution_is_pulled_back_as_cma_repairs_it():
    """cma treats the clients' means as injected solutions and clips each one's distance from the global mean, in
    its own metric ||C^-1/2 (x - m)|| / sigma, at sqrt(n) + 2n / (n + 2): a client that wandered off moves the
    global mean by no more than one that went to that edge."""
    s = FedBPTStrategy(cfg(), popsize=2)
    near, far = np.array([0.1, 0.0, 0.0, 0.0]), np.array([0.0, 30.0, 0.0, 0.0])
    r = s.merge([up("a", near, fitness=0.2, sigmas=[1.0]), up("b", far, fitness=0.6, sigmas=[1.0])])
    sigma, n = r.sigma_merged, 4
    c_inv_sqrt = np.exp(-0.5e-4 / n * np.arange(n))
    edge = math.sqrt(n) + 2 * n / (n + 2)
    pulled = far * edge / np.linalg.norm(c_inv_sqrt * far / sigma)
    w = np.array([math.log(2.5), math.log(1.25)])
    np.testing.assert_allclose(s.mean, (w / w.sum()) @ np.stack([near, pulled]), rtol=0, atol=1e-12)


def test_fedbpt_mean_moves_toward_the_better_client():
    s = FedBPTStrategy(cfg(), popsize=2)
    good, bad = np.array([0.3, 0.0, 0.0, 0.0]), np.array([-0.3, 0.0, 0.0, 0.0])
    s.merge([up("a", bad, fitness=0.9), up("b", good, fitness=0.1)])
    assert s.mean[0] > 0
    assert np.linalg.norm(s.mean - good) < np.linalg.norm(s.mean - bad)
    # with CMA_mu = 2, the better mean weighs RecombinationWeights(4)'s first positive weight
    w = RecombinationWeights(4).positive_weights
    np.testing.assert_allclose(s.mean, w[0] * good + w[1] * bad, atol=1e-12)


def test_fewer_reporters_than_popsize_and_a_single_client():
    s = FedBPTStrategy(cfg(), popsize=4)
    sp = s.es.sp
    s.merge([up("a", [0.2, 0, 0, 0], 0.1), up("b", [0, 0.2, 0, 0], 0.5)])  # 2 of 4 reported
    assert s.es.sp is sp and s.es.sp.popsize == 4 and s.es.opts["CMA_mu"] == 4
    w = RecombinationWeights(4).positive_weights
    np.testing.assert_allclose(s.mean, [0.2 * w[0], 0.2 * w[1], 0, 0], atol=1e-12)

    central = make_strategy(cfg(strategy="centralized"), popsize=1)
    central.merge([up("all", [0.1, -0.1, 0.2, 0.0], 0.3, [1.0, 0.8])])
    np.testing.assert_allclose(central.mean, [0.1, -0.1, 0.2, 0.0], atol=1e-12)
    central.merge([up("all", [0.2, -0.1, 0.2, 0.1], 0.2, [0.9])])
    np.testing.assert_allclose(central.mean, [0.2, -0.1, 0.2, 0.1], atol=1e-12)


def test_fedbpt_restored_from_pickle_continues_identically():
    def play(s, rounds, rng):
        for _ in range(rounds):
            s.merge([up(c, s.mean + rng.normal(size=4) * 0.3, float(rng.random()), [0.9, 0.8]) for c in "abc"])
        return s

    straight = play(FedBPTStrategy(cfg(seed=3), popsize=3), 4, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    restored = pickle.loads(pickle.dumps(play(FedBPTStrategy(cfg(seed=3), popsize=3), 2, rng)))
    np.random.seed(12345)  # cma's ask draws from the global RNG: the merge must not depend on it
    play(restored, 2, rng)
    np.testing.assert_array_equal(straight.mean, restored.mean)
    assert straight.sigma == restored.sigma and straight.local_sigma == restored.local_sigma


def test_fedavg_z_weights_by_samples():
    s = FedAvgZStrategy(cfg(intrinsic_dim=2), popsize=2)
    r = s.merge([up("a", [0.0, 0.0], sigmas=[0.9, 0.4], n=1), up("b", [3.0, 6.0], sigmas=[1.0], n=2)])
    np.testing.assert_allclose(s.mean, [2.0, 4.0])  # (1*0 + 2*3) / 3, (1*0 + 2*6) / 3
    assert s.sigma == r.sigma_after == pytest.approx(0.8)  # (1*0.4 + 2*1.0) / 3
    assert s.local_start("anyone").local_sigma == pytest.approx(0.8)


def test_fedavg_z_and_local_only_continue_from_the_final_step_size_when_sent():
    """`sigmas` are the step sizes the iterations sampled with; where a client also sends the step size after
    its last iteration, that is where the next search starts."""
    fed = FedAvgZStrategy(cfg(intrinsic_dim=2), popsize=2)
    a = ClientUpdate("a", np.zeros(2), 1.0, [0.9, 0.4], 1, final_sigma=0.3)
    b = ClientUpdate("b", np.ones(2), 1.0, [1.0], 1)
    assert fed.merge([a, b]).sigma_after == pytest.approx((0.3 + 1.0) / 2)
    own = LocalOnlyStrategy(cfg(intrinsic_dim=2), popsize=2)
    own.merge([a, b])
    assert own.local_start("a").local_sigma == 0.3 and own.local_start("b").local_sigma == 1.0


def test_local_only_keeps_each_client_on_its_own():
    s = LocalOnlyStrategy(cfg(intrinsic_dim=2, sigma0=1.0), popsize=2)
    s.merge([up("a", [1.0, 1.0], sigmas=[0.7]), up("b", [-1.0, 2.0], sigmas=[0.6])])
    assert s.local_start("a").mean.tolist() == [1.0, 1.0] and s.local_start("a").local_sigma == 0.7
    assert s.local_start("b").mean.tolist() == [-1.0, 2.0]
    assert s.local_start("new").mean.tolist() == [0.0, 0.0] and s.local_start("new").sigma == 1.0
    assert sorted(s.client_means()) == ["a", "b"]
    np.testing.assert_array_equal(s.mean, [0.0, 0.0])


def test_global_es_adapts_sigma_from_the_mean_shift_at_any_dimension():
    # cma would pick two-point adaptation at d >= 300, whose signal is a candidate pair no client evaluates
    s = FedBPTStrategy(cfg(intrinsic_dim=500), popsize=3)
    assert isinstance(s.es.adapt_sigma, CMAAdaptSigmaCSA)


def test_every_wire_name_has_a_strategy_class_and_no_other():
    assert tuple(STRATEGY_CLASSES) == STRATEGIES
    assert all(issubclass(c, Strategy) for c in STRATEGY_CLASSES.values())
    with pytest.raises(TypeError):
        Strategy(cfg(), popsize=1)  # abstract: a strategy without a merge is no strategy


def test_strategies_own_their_perturbation_and_config_rules():
    assert make_strategy(cfg(), 2).clients_perturb(cfg())
    assert not make_strategy(cfg(), 2).clients_perturb(cfg(perturb=False))
    assert not make_strategy(cfg(strategy="fedavg-z"), 2).clients_perturb(cfg(strategy="fedavg-z"))
    noperturb = cfg(strategy="fedbpt-noperturb")
    assert STRATEGY_CLASSES["fedbpt-noperturb"].configure(noperturb).perturb is False
    assert STRATEGY_CLASSES["fedbpt"].configure(cfg()) == cfg()


def _es(popsize: int, d: int = 6):
    opts = {"popsize": popsize, "CMA_mu": popsize, "seed": 7, "verbose": -9, "AdaptSigma": CMAAdaptSigmaCSA}
    return cma.CMAEvolutionStrategy(np.zeros(d), 1.0, inopts=opts)


@pytest.mark.parametrize("told", [2, 3, 6])
def test_tell_generation_is_pycmas_own_tell_of_an_es_that_size(told):
    """Against a twin built with popsize = CMA_mu = the generation's size, told by pycma itself: the same mean
    and covariance. The ES keeps its own options and parameters afterwards."""
    rng = np.random.default_rng(1)
    solutions, fitnesses = [rng.normal(size=6) for _ in range(told)], list(rng.normal(size=told))
    es, twin = _es(popsize=4), _es(popsize=told)
    opts, sp = dict(es.opts), es.sp
    tell_generation(es, solutions, fitnesses)
    twin.ask()
    twin.tell(solutions, fitnesses)
    np.testing.assert_allclose(es.mean, twin.mean, rtol=0, atol=1e-14)
    np.testing.assert_allclose(es.C, twin.C, rtol=0, atol=1e-14)
    assert es.sp is sp and dict(es.opts) == opts
    # every solution a parent, weighted by rank: the mean by hand
    w = RecombinationWeights(2 * told).positive_weights
    by_hand = sum(wi * solutions[i] for wi, i in zip(w, np.argsort(fitnesses, kind="stable")))
    np.testing.assert_allclose(es.mean, by_hand, rtol=0, atol=1e-12)


def test_tell_generation_of_one_solution_puts_the_mean_on_it():
    es = _es(popsize=4)
    tell_generation(es, [np.full(6, 0.3)], [0.5])
    np.testing.assert_allclose(es.mean, np.full(6, 0.3), atol=1e-12)
