"""The rules of a run, one class per strategy (FedBPT and its baselines), Flower style.

Pure math over numpy arrays and a `cma` object: no HTTP and no storage, so every rule can be
checked by hand. A strategy says how the run config is read, which clients a round samples, what a
selected client starts from and whether it perturbs its fitness, and holds the global search
distribution between rounds, which `merge` folds a round's updates into. `state` names the arrays a merge
changed and `restore` puts them back on a strategy built from the same config (strategy_state.py stores them
after every merge), so a restart resumes from the exact state. The names are
`fedbpt_wire.federation.STRATEGIES`; `STRATEGY_CLASSES` maps each to its class.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import ClassVar

import cma
import numpy as np
from cma.recombination_weights import RecombinationWeights
from numpy.typing import ArrayLike

from fedbpt_wire.federation import RunConfig, UpdateRequest
from fedbpt_wire.tensors import decode_tensor

from .cma_generation import tell_generation
from .cma_state import es_state, restore_es

_SEED_MASK = 2**64 - 1  # SeedSequence takes non-negative ints; the mask maps a negative run seed onto one


@dataclass(frozen=True)
class ClientUpdate:
    client_id: str
    mean: np.ndarray  # [d], the client's final local mean m_k
    fitness: float  # f_k, lower is better
    sigmas: Sequence[float]  # the local CMA-ES step size each local iteration sampled with
    num_samples: int  # n_k
    final_sigma: float | None = None  # the step size after the last iteration (older clients: sigmas[-1])

    @property
    def last_sigma(self) -> float:
        return float(self.final_sigma if self.final_sigma is not None else self.sigmas[-1])


@dataclass(frozen=True)
class LocalStart:
    """Where a selected client's local search starts."""

    mean: np.ndarray
    sigma: float  # the global step size
    local_sigma: float | None  # the step size its local CMA-ES starts with (None: the global one)


@dataclass(frozen=True)
class MergeResult:
    sigma_merged: float | None  # FedBPT: the step size the sigma rule set on the global ES before its tell
    sigma_after: float  # the global step size after the merge


def pooled_sigma(sigmas: Sequence[Sequence[float]], local_popsize: int) -> float:
    """sqrt(sum_k sum_i sigma_{k,i}^2 / m / mu_local), m the number of clients that reported.

    Dividing by the reporters rather than the clients sampled keeps a round with a straggler from
    shrinking the step size just because fewer terms were summed.
    """
    mu_local = RecombinationWeights(local_popsize).mu
    total = sum(float(s) ** 2 for client in sigmas for s in client)
    return math.sqrt(total / len(sigmas) / mu_local)


def paper_eq6_sigma(sigmas: Sequence[Sequence[float]], fitnesses: Sequence[float], local_popsize: int) -> float:
    """2 * sqrt(sum over the best-fitness half of the clients of sum_i sigma_{k,i}^2 / (m * lambda_local)).

    The half is rounded up so a single reporter still counts; ties keep the reporters' order.
    """
    m = len(sigmas)
    best = np.argsort(np.asarray(fitnesses, dtype=float), kind="stable")[: math.ceil(m / 2)]
    total = sum(float(s) ** 2 for k in best for s in sigmas[k])
    return 2.0 * math.sqrt(total / (m * local_popsize))


# A local step size past this many times max(global, local start) is a client bug or an attack: CSA grows sigma
# by a modest factor per iteration, and a run's local searches take a handful of iterations.
SIGMA_CLIP = 10.0
# Bounds the run sets on the global step size whatever the clients send: honest FedBPT runs shrink it round after
# round (1 -> 0.65 -> 0.63 -> 0.61 -> 0.61 in the CPU demo), an attacker's inflated step sizes would compound it
# (1 -> 6.6 -> 43 -> 290 -> 1979 over four rounds before these bounds). At most x2 per round, x4 sigma0 in all.
SIGMA_GROWTH_PER_ROUND = 2.0
SIGMA_MAX_RATIO = 4.0


def sigma_bound(sigma_before: float, sigma0: float) -> float:
    """The largest global step size a merge may leave, from the run's own numbers only."""
    return min(SIGMA_GROWTH_PER_ROUND * sigma_before, SIGMA_MAX_RATIO * sigma0)


def clip_displacement(mean: np.ndarray, center: np.ndarray, radius: float) -> tuple[np.ndarray, bool]:
    """`mean` pulled back onto the sphere of `radius` around `center` where it lies outside; and whether it did."""
    offset = np.asarray(mean, dtype=float) - center
    norm = float(np.linalg.norm(offset))
    if norm <= radius:
        return np.asarray(mean, dtype=float), False
    return center + offset * (radius / norm), True


def bound_updates(
    updates: Sequence[ClientUpdate],
    center: np.ndarray,
    sigma: float,
    local_sigma: float | None,
    clip_multiple: float,
    max_weight_ratio: float,
    sigma0: float,
    newcomers: Collection[str] = (),
    newcomer_clip: float = 1.0,
) -> tuple[list[ClientUpdate], int]:
    """The round's updates with every client's pull on the merge bounded; and how many were changed.

    - mean: at most clip_multiple x min(sigma, sigma0) x sqrt(d) from the global mean the round started from.
      Every strategy's new mean is a convex combination of the clients' means, so no set of updates can move the
      global mean farther than that radius in one round, and one client moves it by at most its weight times it.
      The radius follows sigma down but never above sigma0: clients raise sigma, so they must not raise it.
    - step sizes: each at most SIGMA_CLIP x max(sigma, local_sigma), both bounded by the run (`sigma_bound`).
    - num_samples: at most max_weight_ratio x the round's median (fedavg-z's weights).
    - `newcomers` (ids that joined after round 0 and have not yet reported in a few merged rounds): mean at most
      newcomer_clip x the radius, step sizes at most max(sigma, local_sigma). The merged mean is a convex
      combination, so the new ids together pull it at most newcomer_clip x radius, however many they are.
    """
    d = center.shape[0]
    radius = clip_multiple * min(sigma, sigma0) * math.sqrt(d) if clip_multiple > 0 else math.inf
    sigma_cap = SIGMA_CLIP * max(sigma, local_sigma or 0.0)
    median_n = float(np.median([u.num_samples for u in updates])) if updates else 0.0
    n_cap = max_weight_ratio * median_n if median_n > 0 else math.inf
    newcomer_sigma_cap = max(sigma, local_sigma or 0.0)
    out, changed = [], 0
    for u in updates:
        new = u.client_id in newcomers
        mean, moved = clip_displacement(u.mean, center, radius * newcomer_clip if new else radius)
        cap = newcomer_sigma_cap if new else sigma_cap
        sigmas = [min(float(s), cap) for s in u.sigmas]
        final = None if u.final_sigma is None else min(float(u.final_sigma), cap)
        n = int(min(u.num_samples, n_cap))
        if moved or sigmas != [float(s) for s in u.sigmas] or final != u.final_sigma or n != u.num_samples:
            changed += 1
        out.append(ClientUpdate(u.client_id, mean, u.fitness, sigmas, n, final))
    return out, changed


def robust_average(rows: ArrayLike, how: str) -> np.ndarray:
    """Coordinate-wise median, or mean after dropping the lowest and highest max(1, m // 5) per coordinate
    (m >= 3; fewer rows leave nothing to trim and take the mean)."""
    table = np.asarray(rows, dtype=float)
    if how == "median":
        return np.median(table, axis=0)
    m = table.shape[0]
    if m < 3:
        return table.mean(axis=0)
    trim = max(1, m // 5)
    return np.sort(table, axis=0)[trim : m - trim].mean(axis=0)


def next_local_sigma(previous: float, before: float, after: float, floor: float) -> float:
    """previous x (after / before), clipped to [floor, previous].

    The upper bound is applied last, as in the reference code, so the local step size never grows,
    even where the floor lies above it (a run started with sigma0 under the floor).
    """
    return min(previous, max(floor, previous * after / before))


class Strategy(ABC):
    """A run's rules; a subclass implements `merge` and overrides the rules where it departs from FedBPT's."""

    # Each client tunes a prompt of its own (no global one): its update is not bounded around a global mean,
    # and the clients' own means are what `GET /v1/global` shows.
    own_prompts: ClassVar[bool] = False
    local_sigma: float | None = None  # one step size for every selected client, where there is one

    @classmethod
    def configure(cls, config: RunConfig) -> RunConfig:
        """The run config as this strategy runs it, handed to every client."""
        return config

    @classmethod
    def select(
        cls, config: RunConfig, client_ids: Sequence[str], round_: int, silent: frozenset[str] = frozenset()
    ) -> list[str]:
        """The clients round `round_` samples: ceil(participation x registered), sorted, drawn by a Generator
        seeded by (seed, round), from the ids not `silent` first (those that did not report when last selected):
        silent ones fill only the places the others cannot. A class rule: round 0's sample sizes the strategy
        built for it."""
        # Rounded first, so 0.3 x 10 = 3.0000000000000004 samples 3 clients, not 4.
        n = max(1, math.ceil(round(config.participation * len(client_ids), 9)))
        rng = np.random.default_rng([config.seed & _SEED_MASK, round_])
        active = [c for c in client_ids if c not in silent]
        if len(active) >= n:
            return sorted(active[i] for i in rng.choice(len(active), size=n, replace=False))
        rest = [c for c in client_ids if c in silent]
        return sorted([*active, *(rest[i] for i in rng.choice(len(rest), size=n - len(active), replace=False))])

    def __init__(self, config: RunConfig, popsize: int):
        self.popsize = popsize
        self.mean = np.zeros(config.intrinsic_dim)
        self.sigma = float(config.sigma0)

    def local_start(self, client_id: str) -> LocalStart:
        return LocalStart(self.mean, self.sigma, self.local_sigma)

    def state(self) -> dict[str, np.ndarray]:
        """What merges changed, as named arrays; the rest follows from the run config and `popsize`."""
        out = {
            "popsize": np.asarray(self.popsize, dtype=np.int64),
            "mean": np.asarray(self.mean, dtype=np.float64),
            "sigma": np.asarray(self.sigma, dtype=np.float64),
        }
        if self.local_sigma is not None:
            out["local_sigma"] = np.asarray(self.local_sigma, dtype=np.float64)
        return out

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Put `state()`'s arrays back on a strategy built from the same config and popsize."""
        self.mean = np.array(arrays["mean"], dtype=np.float64)
        self.sigma = float(arrays["sigma"])
        if "local_sigma" in arrays:
            self.local_sigma = float(arrays["local_sigma"])

    def clients_perturb(self, config: RunConfig) -> bool:
        """Whether a selected client's local fitness divides by its loss on a perturbed copy of its batch."""
        return config.perturb

    @abstractmethod
    def merge(self, updates: Sequence[ClientUpdate]) -> MergeResult:
        """Fold a round's updates into the distribution; raising leaves the round failed and the state as it was."""

    def client_means(self) -> dict[str, np.ndarray] | None:
        return None

    def limit_sigma(self, cap: float) -> bool:
        """Bring the global (and the next local) step size down to `cap` where a merge left it above; whether it did."""
        if self.sigma <= cap:
            return False
        self.sigma = cap
        if self.local_sigma is not None:
            self.local_sigma = min(self.local_sigma, cap)
        return True


class FedBPTStrategy(Strategy):
    """FedBPT (`fedbpt`, and `centralized`: one client holding all data): the clients' means are one
    generation of a global CMA-ES."""

    local_sigma: float

    def __init__(self, config: RunConfig, popsize: int):
        super().__init__(config, popsize)
        self.local_sigma = float(config.sigma0)
        self.sigma_rule = config.sigma_rule
        self.local_popsize = config.local_popsize
        self.local_sigma_floor = config.local_sigma_floor
        # cma reads seed 0 as "seed from the clock"; shift so every run seed is reproducible.
        seed = config.seed % (2**32 - 1) + 1
        # Step-size adaptation by CSA at every d: from d = 300 on cma defaults to two-point adaptation,
        # which reads sigma's change off the ranks of ask()'s first two candidates, a mirrored pair the
        # clients never evaluate; CSA reads it off the mean shift, which the clients' means do carry.
        opts = {
            "popsize": popsize,
            "CMA_mu": popsize,
            "seed": seed,
            "verbose": -9,
            "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA,
        }
        self.es = cma.CMAEvolutionStrategy(self.mean.copy(), self.sigma, inopts=opts)

    def state(self) -> dict[str, np.ndarray]:
        return super().state() | es_state(self.es, prefix="es.")

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        super().restore(arrays)
        restore_es(self.es, arrays, prefix="es.")

    def merge(self, updates: Sequence[ClientUpdate]) -> MergeResult:
        # A fixed order makes the tell independent of arrival order (ties in fitness keep it).
        ups = sorted(updates, key=lambda u: u.client_id)
        sigmas = [u.sigmas for u in ups]
        if self.sigma_rule == "paper-eq6":
            merged = paper_eq6_sigma(sigmas, [u.fitness for u in ups], self.local_popsize)
        else:
            merged = pooled_sigma(sigmas, self.local_popsize)
        self.es.sigma = merged
        tell_generation(self.es, [np.asarray(u.mean, dtype=float) for u in ups], [float(u.fitness) for u in ups])
        after = float(self.es.sigma)
        self.local_sigma = next_local_sigma(self.local_sigma, merged, after, self.local_sigma_floor)
        self.mean = np.array(self.es.mean, dtype=float)
        self.sigma = after
        return MergeResult(sigma_merged=merged, sigma_after=after)

    def limit_sigma(self, cap: float) -> bool:
        limited = super().limit_sigma(cap)
        if limited:
            self.es.sigma = self.sigma  # the global ES samples and adapts from the bounded step size
        return limited


class FedBPTNoPerturbStrategy(FedBPTStrategy):
    """`fedbpt-noperturb`: FedBPT's merge over clients whose fitness is the plain loss."""

    @classmethod
    def configure(cls, config: RunConfig) -> RunConfig:
        # Clients see `perturb`; the baseline's name must not be contradicted by a default left on.
        return config.model_copy(update={"perturb": False}) if config.perturb else config


class FedAvgZStrategy(Strategy):
    """FedBBT (`fedavg-z`): the n_k-weighted average of the clients' means and final step sizes, or with
    `robust_merge` their coordinate-wise median or trimmed mean (unweighted: a weight is the client's word)."""

    def __init__(self, config: RunConfig, popsize: int):
        super().__init__(config, popsize)
        self.local_sigma = self.sigma
        self.robust = config.robust_merge

    def clients_perturb(self, config: RunConfig) -> bool:
        return False  # FedBBT: each client runs plain BBT

    def merge(self, updates: Sequence[ClientUpdate]) -> MergeResult:
        if self.robust != "none":
            self.mean = robust_average([np.asarray(u.mean, dtype=float) for u in updates], self.robust)
            self.sigma = float(robust_average(np.array([[u.last_sigma] for u in updates]), self.robust)[0])
            self.local_sigma = self.sigma
            return MergeResult(sigma_merged=None, sigma_after=self.sigma)
        weights = np.array([u.num_samples for u in updates], dtype=float)
        if weights.sum() <= 0:  # no client counted its samples: every client weighs the same
            weights = np.ones(len(updates))
        weights /= weights.sum()
        self.mean = np.sum([w * np.asarray(u.mean, dtype=float) for w, u in zip(weights, updates)], axis=0)
        self.sigma = float(sum(w * u.last_sigma for w, u in zip(weights, updates)))
        self.local_sigma = self.sigma
        return MergeResult(sigma_merged=None, sigma_after=self.sigma)


class LocalOnlyStrategy(Strategy):
    """No federation (`local-only`): each client continues from its own last mean and step size.

    There is no global prompt: `mean` and `sigma` stay at the start point, `client_means` holds the
    clients' own prompts.
    """

    own_prompts = True

    def __init__(self, config: RunConfig, popsize: int):
        super().__init__(config, popsize)
        self._means: dict[str, np.ndarray] = {}
        self._sigmas: dict[str, float] = {}

    def local_start(self, client_id: str) -> LocalStart:
        if client_id not in self._means:
            return LocalStart(self.mean, self.sigma, self.sigma)
        own = self._sigmas[client_id]
        return LocalStart(self._means[client_id], own, own)

    def state(self) -> dict[str, np.ndarray]:
        ids = sorted(self._means)
        return super().state() | {
            "client_ids": np.array(ids, dtype=np.str_),
            "client_means": np.array([self._means[c] for c in ids], dtype=np.float64).reshape(len(ids), len(self.mean)),
            "client_sigmas": np.array([self._sigmas[c] for c in ids], dtype=np.float64),
        }

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        super().restore(arrays)
        ids = [str(c) for c in arrays["client_ids"]]
        self._means = {c: np.array(m, dtype=np.float64) for c, m in zip(ids, arrays["client_means"])}
        self._sigmas = {c: float(s) for c, s in zip(ids, arrays["client_sigmas"])}

    def merge(self, updates: Sequence[ClientUpdate]) -> MergeResult:
        for u in updates:
            self._means[u.client_id] = np.asarray(u.mean, dtype=float)
            self._sigmas[u.client_id] = u.last_sigma
        return MergeResult(sigma_merged=None, sigma_after=self.sigma)

    def client_means(self) -> dict[str, np.ndarray]:
        return dict(sorted(self._means.items()))


STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    "fedbpt": FedBPTStrategy,
    "fedbpt-noperturb": FedBPTNoPerturbStrategy,
    "fedavg-z": FedAvgZStrategy,
    "centralized": FedBPTStrategy,
    "local-only": LocalOnlyStrategy,
}


def strategy_class(config: RunConfig) -> type[Strategy]:
    return STRATEGY_CLASSES[config.strategy]


def make_strategy(config: RunConfig, popsize: int) -> Strategy:
    """The run's strategy; `popsize` is the number of clients sampled for round 0 (FedBPT's m)."""
    return strategy_class(config)(config, popsize)


def merge_round(
    strategy: Strategy,
    updates: Sequence[tuple[str, UpdateRequest]],
    config: RunConfig,
    newcomers: Collection[str] = (),
) -> tuple[MergeResult, int]:
    """A round's validated updates, in client-id order, bounded against `strategy`'s state (unless each client's
    mean moves only its own prompt) and merged into it: the merge's result and how many updates were bounded.
    Every host of the strategies (the native coordinator, the Flower ServerApp) merges through here; `newcomers`
    are the ids still new to the run (bound_updates)."""
    ups = [
        ClientUpdate(cid, decode_tensor(u.mean), u.fitness, u.sigmas, u.num_samples, u.final_sigma)
        for cid, u in updates
    ]
    clipped = 0
    if strategy.own_prompts:
        return strategy.merge(ups), clipped
    before = strategy.sigma
    ups, clipped = bound_updates(
        ups,
        strategy.mean,
        before,
        strategy.local_sigma,
        config.clip_multiple,
        config.max_weight_ratio,
        config.sigma0,
        newcomers if config.newcomer_rounds > 0 else (),
        config.newcomer_clip,
    )
    result = strategy.merge(ups)
    if strategy.limit_sigma(sigma_bound(before, config.sigma0)):
        result = dataclasses.replace(result, sigma_after=strategy.sigma)
    return result, clipped
