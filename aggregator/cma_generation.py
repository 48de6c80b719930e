"""Telling a pycma `CMAEvolutionStrategy` one generation of any size, every solution a parent.

pycma expects `popsize` solutions per `tell` and, with `CMA_mu = popsize` (FedBPT's m clients all parents),
refuses fewer. A federated round can bring fewer (a deadline merge) or more (a round that sampled more
clients than round 0) client means than the global ES was built for. Its own size-change path in `tell`
is switched off upstream ("not really tested"), so this module is the one place that does it, and
tests/aggregator/test_strategies.py pins it against a twin ES built with the generation's size.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import cma
import numpy as np

MIN_GENERATION = 3  # pycma's smallest generation (mirrors counted)


def generation_parameters(es: cma.CMAEvolutionStrategy, size: int) -> cma.options_parameters.CMAParameters:
    """pycma's strategy parameters for `es` with `size` solutions per generation, all of them parents.

    Computed by pycma's own `CMAParameters` from a copy of the ES's options, so `es.opts` never changes.
    """
    opts = copy.copy(es.opts)
    opts["CMA_mu"] = size
    params = copy.deepcopy(es.sp)
    params.set(opts, popsize=size, ccovfac=opts["CMA_on"], verbose=False)
    return params


def tell_generation(es: cma.CMAEvolutionStrategy, solutions: Sequence[np.ndarray], fitnesses: Sequence[float]) -> None:
    """`es.ask()` then `es.tell(solutions, fitnesses)` with the strategy parameters of a generation of
    `len(solutions)`, which are put back afterwards: the update an ES of that popsize (CMA_mu = popsize) makes,
    with nothing invented for missing solutions (padding with the old mean would drag the mean back and shrink
    sigma), and cma's standard update when the size is the ES's own.

    Step-size adaptation keeps the constants it computed at the start (CSA's cs and damps), as pycma does
    whatever is told. A single solution is told as three identical ones, whose recombination is itself (the
    weights sum to one).
    """
    solutions, fitnesses = list(solutions), list(fitnesses)
    if len(solutions) == 1:
        solutions, fitnesses = solutions * MIN_GENERATION, fitnesses * MIN_GENERATION
    own = es.sp
    if len(solutions) != own.popsize:
        es.sp = generation_parameters(es, len(solutions))
    try:
        with warnings.catch_warnings():
            # The asked candidates only satisfy cma's ask/tell protocol and are never evaluated, so the
            # mirrors cma injects into them are orphaned by design.
            warnings.simplefilter("ignore", cma.evolution_strategy.InjectionWarning)
            es.ask()
            es.tell(solutions, fitnesses)
    finally:
        es.sp = own
