"""Prompts sent in the compact seed + z form, expanded here with the clients' own projection code."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from fedbpt_wire.projection import Projection, projection_from_spec
from fedbpt_wire.schemas import ProjectionSpec


class ProjectionCache:
    """The last few projections built, keyed by everything that defines them.

    A run sends the same spec with every request; drawing A ([d, L*D] normals) anew each time would
    cost more than a small model's forward pass. The bound keeps memory flat whatever specs arrive.
    """

    def __init__(
        self,
        hidden_size: int,
        embedding_std: float,
        size: int = 2,
        token_embeddings=None,
        vocab_size: int | None = None,
    ):
        self.hidden_size = hidden_size
        self.embedding_std = embedding_std
        self.token_embeddings = token_embeddings  # ids -> [n, D]: the engine's, for init 'tokens', basis 'embeddings'
        self.vocab_size = vocab_size
        self.size = size
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, Projection] = OrderedDict()

    @staticmethod
    def _key(spec: ProjectionSpec, intrinsic_dim: int) -> tuple:
        # Every field of the spec, so a field added to it can never be served another spec's projection.
        return (*spec.model_dump().values(), intrinsic_dim)

    def holds(self, spec: ProjectionSpec, intrinsic_dim: int) -> bool:
        with self._lock:
            return self._key(spec, intrinsic_dim) in self._cache

    def get(self, spec: ProjectionSpec, intrinsic_dim: int) -> Projection:
        key = self._key(spec, intrinsic_dim)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        # Built outside the lock: a large A takes a while, and other specs need not wait for it.
        projection = projection_from_spec(
            spec, intrinsic_dim, self.hidden_size, self.embedding_std, self.token_embeddings, self.vocab_size
        )
        with self._lock:
            self._cache[key] = projection
            self._cache.move_to_end(key)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return projection

    def expand(self, spec: ProjectionSpec, z: np.ndarray) -> np.ndarray:
        """z [P, d] -> prompts [P, L, D] float32, exactly as the client's `Projection(z)`."""
        return self.get(spec, z.shape[1])(z)
