"""FedBPT's round-0 merge against a pycma twin: a `cma.CMAEvolutionStrategy` built and driven here, from
docs/design.md section 2, with no code of aggregator/ in the reference.

Design, step 1: the global ES starts at mean 0 with sigma0, popsize m = the clients sampled, CMA_mu = m, and adapts its
step size by CSA (section 6: at every d). Step 4: the sigma rule sets the ES's sigma, which then takes ask() and
tell(the clients' means, their fitnesses); the next local step size is previous x (after / before), clipped to
[floor, previous]. `round_zero_by_twin` is that, and tests/system/test_federated.py checks the published round 0 of
a real federation with it too.
"""

from __future__ import annotations

import math
import warnings

import cma
import numpy as np
import pytest

from aggregator.strategies import ClientUpdate, make_strategy
from fedbpt_wire.federation import RunConfig

TWIN_SEED = 987654  # not the run's seed: the merge must not depend on what the never-evaluated ask() draws


def sigma_by_rule(rule: str, sigmas: list[list[float]], fitnesses: list[float], local_popsize: int) -> float:
    """The step size the rule sets on the global ES, written from the design doc.

    pooled: sqrt(sum_k sum_i sigma_ki^2 / m / mu_local), mu_local = floor(lambda_local / 2), CMA-ES's parent count.
    paper-eq6: 2 sqrt(sum over the best-fitness half of the clients (rounded up) / (m lambda_local)).
    """
    m = len(sigmas)
    if rule == "pooled":
        return math.sqrt(sum(s * s for client in sigmas for s in client) / m / (local_popsize // 2))
    best = sorted(range(m), key=lambda k: fitnesses[k])[: math.ceil(m / 2)]
    return 2 * math.sqrt(sum(s * s for k in best for s in sigmas[k]) / (m * local_popsize))


def round_zero_by_twin(config: RunConfig, sampled: int, updates: list[tuple[str, np.ndarray, float, list[float]]]):
    """(mean, sigma set by the rule, sigma after the tell, next local sigma) of round 0, every sampled client
    reporting (client id, final mean, fitness, local step sizes)."""
    ups = sorted(updates, key=lambda u: u[0])
    assert len(ups) == sampled, "the twin tells a full generation: every sampled client reported"
    merged = sigma_by_rule(config.sigma_rule, [u[3] for u in ups], [u[2] for u in ups], config.local_popsize)
    opts = {
        "popsize": sampled,
        "CMA_mu": sampled,
        "seed": TWIN_SEED,
        "verbose": -9,
        "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA,
    }
    es = cma.CMAEvolutionStrategy(np.zeros(config.intrinsic_dim), config.sigma0, inopts=opts)
    es.sigma = merged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cma.evolution_strategy.InjectionWarning)
        es.ask()
        es.tell([np.asarray(u[1], dtype=float) for u in ups], [float(u[2]) for u in ups])
    after = float(es.sigma)
    local = min(config.sigma0, max(config.local_sigma_floor, config.sigma0 * after / merged))
    return np.array(es.mean, dtype=float), merged, after, local


def clients(m: int, d: int, seed: int) -> list[tuple[str, np.ndarray, float, list[float]]]:
    """m clients' round-0 reports: means near 0, distinct fitnesses, local step sizes shrinking over 3 iterations."""
    rng = np.random.default_rng(seed)
    fitnesses = rng.permutation(np.linspace(0.3, 1.2, m))
    return [
        (f"client-{k}", rng.normal(size=d) * 0.4, float(fitnesses[k]), [1.0, float(rng.uniform(0.6, 0.9)), 0.55])
        for k in range(m)
    ]


@pytest.mark.parametrize("strategy", ["fedbpt", "fedbpt-noperturb"])
@pytest.mark.parametrize("rule", ["pooled", "paper-eq6"])
@pytest.mark.parametrize("m,d", [(2, 12), (5, 12), (3, 320)])
def test_round_zero_merge_is_the_twins(strategy, rule, m, d):
    """fedbpt-noperturb only changes the clients' fitness (no perturbed copy); its merge is FedBPT's. At d = 320 pycma
    would pick two-point step-size adaptation by itself, so CSA must be the merge's own choice there."""
    config = RunConfig(
        run_id="twin", strategy=strategy, intrinsic_dim=d, local_popsize=6, sigma_rule=rule, seed=m, sigma0=1.0
    )
    reports = clients(m, config.intrinsic_dim, seed=m)
    mean, merged, after, local = round_zero_by_twin(config, m, reports)
    strategy_ = make_strategy(config, popsize=m)
    result = strategy_.merge([ClientUpdate(cid, z, f, s, 10) for cid, z, f, s in reversed(reports)])
    assert result.sigma_merged == pytest.approx(merged, rel=1e-14)
    assert result.sigma_after == strategy_.sigma == pytest.approx(after, rel=1e-12)
    np.testing.assert_allclose(strategy_.mean, mean, rtol=0, atol=1e-13)
    assert strategy_.local_sigma == pytest.approx(local, rel=1e-12)
    task = strategy_.local_start("client-0")
    assert task.local_sigma == strategy_.local_sigma and task.sigma == strategy_.sigma


def test_the_two_rules_differ_on_these_inputs():
    """Otherwise the parametrisation above could not tell a swapped rule from the right one."""
    reports = clients(5, 12, seed=5)
    sigmas, fitnesses = [r[3] for r in reports], [r[2] for r in reports]
    pooled, eq6 = sigma_by_rule("pooled", sigmas, fitnesses, 6), sigma_by_rule("paper-eq6", sigmas, fitnesses, 6)
    assert abs(pooled - eq6) > 0.05 * pooled
    # eq6's best half is the 3 lowest fitnesses, not the first 3 reporters
    first_three = 2 * math.sqrt(sum(s * s for c in sigmas[:3] for s in c) / (5 * 6))
    assert eq6 != pytest.approx(first_three)
