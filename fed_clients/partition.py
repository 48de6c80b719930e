"""Seeded data partitions: few-shot sampling, IID and Dirichlet(alpha) non-IID splits over clients."""

from __future__ import annotations

import numpy as np


def few_shot(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` examples of each class (all of a class that has fewer), seeded."""
    rng = np.random.default_rng([seed, 1])
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return np.sort(np.concatenate(picked))


def iid_partition(n: int, n_clients: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng([seed, 2]).permutation(n)
    return [np.sort(part) for part in np.array_split(order, n_clients)]


def dirichlet_partition(
    labels: np.ndarray, n_clients: int, alpha: float, seed: int, min_size: int = 2, max_tries: int = 100
) -> list[np.ndarray]:
    """Per class, proportions ~ Dirichlet(alpha) over clients; redrawn until every client holds `min_size`.

    Small alpha gives each client a few dominant classes (label skew); alpha -> inf tends to IID.
    """
    if alpha <= 0:
        raise ValueError("alpha must be positive")
    labels = np.asarray(labels)
    if len(labels) < n_clients * min_size:
        raise ValueError(f"{len(labels)} examples cannot give {n_clients} clients {min_size} each")
    rng = np.random.default_rng([seed, 3])
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise RuntimeError(f"no Dirichlet({alpha}) draw in {max_tries} gave every client {min_size} examples")


def partition(labels: np.ndarray, n_clients: int, alpha: float | None, seed: int) -> list[np.ndarray]:
    """alpha None = IID; else Dirichlet(alpha) label skew."""
    if alpha is None:
        return iid_partition(len(labels), n_clients, seed)
    return dirichlet_partition(labels, n_clients, alpha, seed)


def train_val_split(indices: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's own held-out split: at least one example each side when it has two or more."""
    order = np.random.default_rng([seed, 4]).permutation(indices)
    n_val = int(round(len(order) * val_fraction))
    if len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
