"""The client's local CMA-ES over z, as an ask/tell loop around a fitness function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cma
import numpy as np


@dataclass(frozen=True)
class LocalResult:
    mean: np.ndarray  # final local search mean m_k
    sigmas: list[float]  # the step size each iteration sampled with (as the FedBPT reference records them)
    evaluations: int
    final_sigma: float  # after the last tell: where a continued search would start


def cma_seed(*parts: int) -> int:
    """A positive 31-bit seed from integers (cma treats 0 and None as 'seed from the clock')."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] % (2**31 - 2)) + 1


def local_search(
    fitness: Callable[[np.ndarray, int], np.ndarray],
    mean: np.ndarray,
    sigma: float,
    popsize: int,
    iterations: int,
    seed: int,
    mirrored: bool = False,
    observe: Callable[[int, np.ndarray], None] | None = None,
) -> LocalResult:
    """Start CMA-ES at (mean, sigma); each iteration asks `popsize` candidates and scores them together.

    `fitness(Z [popsize, d], iteration) -> [popsize]`, lower is better: one service call per iteration.
    `mirrored`: half the candidates are the others reflected through the mean (pycma's mirrored sampling with
    selective mirroring off), antithetic pairs that cancel the sampling noise of the mean's update.
    `observe(iteration, mean)` sees the mean before each iteration's candidates are drawn (a study's checkpoints).
    """
    # cma's `seed` reseeds numpy's process-wide generator and samples from it, so clients sharing a process
    # (threads) would draw from one stream in whatever order they ran; a private stream keeps each client's
    # candidates a function of its seed alone (cma's seed NaN: leave the global generator alone).
    rng = np.random.default_rng(seed)
    es = cma.CMAEvolutionStrategy(
        np.asarray(mean, dtype=np.float64),
        float(sigma),
        {
            "popsize": popsize,
            "seed": np.nan,
            "randn": lambda *shape: rng.standard_normal(shape),
            "verbose": -9,
            "maxiter": iterations,
            "CMA_diagonal": False,
            **({"CMA_mirrors": popsize // 2, "CMA_mirrormethod": 0} if mirrored else {}),
        },
    )
    sigmas = []
    evaluations = 0
    for it in range(iterations):
        sigmas.append(float(es.sigma))
        if observe is not None:
            observe(it, np.asarray(es.mean, dtype=np.float64))
        candidates = np.asarray(es.ask())
        values = np.asarray(fitness(candidates, it), dtype=np.float64)
        es.tell(list(candidates), values.tolist())
        evaluations += len(candidates)
    return LocalResult(
        mean=np.asarray(es.mean, dtype=np.float64), sigmas=sigmas, evaluations=evaluations, final_sigma=float(es.sigma)
    )
