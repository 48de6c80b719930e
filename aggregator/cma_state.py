"""A pycma `CMAEvolutionStrategy`'s state as named arrays, and back onto a freshly built twin.

The global ES is rebuilt from the run config (its constructor arguments) and then given the state its
iterations changed: the search distribution (mean, sigma, covariance with its eigendecomposition, both
evolution paths), the iteration counters that time the eigendecomposition and CSA's bias correction, the
selective mirrors a tell leaves for the next ask, and the fitness, best-so-far and stagnation records that
`stop()` and `result` read. Not kept: the archives of the solutions `ask` sent (the clients' means told to
the ES are never among them), the last population, timers, and caches recomputed from what is kept.
tests/aggregator/test_strategy_state.py shows a restored ES asking and merging bit for bit as the one saved.
"""

from __future__ import annotations

import functools

import cma
import numpy as np
from cma.utilities.utils import ElapsedWCTime

# Attribute paths of the ES, by how each is put back. An attribute absent or None is left as the constructor
# made it: no iteration has set it yet.
_STATE = {
    "mean": "array",
    "mean_after_tell": "array",
    "mean_old": "array",
    "mean_old_old": "array",
    "_isotropic_mean_shift": "array",
    "pc": "array",
    "pc2": "array",
    "dC": "array",
    "sm.C": "array",
    "sm.B": "array",
    "sm.D": "array",
    "adapt_sigma.ps": "array",
    "best.x": "array",
    "best.last.x": "array",
    "_stoptolxstagnation.x": "array",
    "sigma": "float",
    "_sigma_old": "float",
    "adapt_sigma.delta": "float",
    "adapt_sigma._last_multiplier": "float",
    "fit.median": "float",
    "fit.median0": "float",
    "fit.median_min": "float",
    "fit.median_previous": "float",
    "best.f": "float",
    "best.last.f": "float",
    "countiter": "int",
    "countevals": "int",
    "itereigenupdated": "int",
    "_isotropic_mean_shift_iteration": "int",
    "sm.count_tell": "int",
    "sm.count_eigen": "int",
    "sm.last_update": "int",
    "adapt_sigma._ps_updated_iteration": "int",
    "fit.median_got_worse": "int",
    "best.evals": "int",
    "best.evalsall": "int",
    "best.compared": "int",
    "_stoptolxstagnation.count": "int",
    "_stoptolxstagnation.count_x": "int",
    "fit.hist": "floats",
    "fit.histbest": "floats",
    "_indices_of_selective_mirrors": "ints",
    "pop_injection_directions": "arrays",  # the mirrors a tell prepared, which the next ask injects first
}


def _get(obj: object, path: str) -> object:
    return functools.reduce(lambda o, name: getattr(o, name, None), path.split("."), obj)


def _set(obj: object, path: str, value: object) -> None:
    *owners, name = path.split(".")
    setattr(functools.reduce(getattr, owners, obj), name, value)


def _array(value: object, kind: str, dimension: int) -> np.ndarray:
    if kind in ("int", "ints"):
        return np.asarray(value, dtype=np.int64)
    if kind == "arrays":
        return np.asarray(value, dtype=np.float64).reshape(-1, dimension)
    return np.asarray(value, dtype=np.float64)


def _value(array: np.ndarray, kind: str) -> object:
    if kind == "array":
        return np.array(array, dtype=np.float64)
    if kind == "float":
        return np.float64(array)
    if kind == "int":
        return int(array)
    if kind == "floats":
        return [float(v) for v in array]
    if kind == "ints":
        return [int(v) for v in array]
    return [np.array(row, dtype=np.float64) for row in array]


def es_state(es: cma.CMAEvolutionStrategy, prefix: str) -> dict[str, np.ndarray]:
    """The ES's state, each attribute an array named `prefix` + its path."""
    out = {}
    for path, kind in _STATE.items():
        value = _get(es, path)
        if value is not None:
            out[prefix + path] = _array(value, kind, es.N)
    return out


def restore_es(es: cma.CMAEvolutionStrategy, arrays: dict[str, np.ndarray], prefix: str) -> None:
    """Put the state `es_state` saved onto `es`, an ES built with the same arguments as the one saved."""
    for path, kind in _STATE.items():
        if prefix + path in arrays:
            _set(es, path, _value(arrays[prefix + path], kind))
    # The ES's own references to its sampler's matrices, as its every tell leaves them.
    es.C, es.B, es.D = es.sm.C, es.sm.B, es.sm.D
    if es.countiter > 0:  # `ask` starts the wall-clock timer in the first iteration only
        es.timer = ElapsedWCTime().pause()
