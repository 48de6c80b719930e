"""The fixed random projection z in R^d -> soft prompt [L, D], drawn from a seed every client shares."""

from __future__ import annotations

import numpy as np


def projection_std(embedding_std: float, intrinsic_dim: int, sigma0: float) -> float:
    """BBT's scale: a z drawn with step size sigma0 gives prompt entries about as spread as word embeddings."""
    return embedding_std / (np.sqrt(intrinsic_dim) * sigma0)


def projection_matrix(seed: int, intrinsic_dim: int, prompt_length: int, hidden_size: int, std: float) -> np.ndarray:
    """A [d, L*D] float32 matrix, normal with the given std; identical for the same arguments everywhere.

    PCG64 streams are stable across NumPy versions, so clients on different machines draw the same A.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.standard_normal((intrinsic_dim, prompt_length * hidden_size), dtype=np.float32)
    a *= np.float32(std)
    return a


def project(z: np.ndarray, matrix: np.ndarray, prompt_length: int, hidden_size: int) -> np.ndarray:
    """z [P, d] (or [d]) -> prompts [P, L, D] float32."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float32))
    return (z @ matrix).reshape(len(z), prompt_length, hidden_size)


class Projection:
    """A and its shape together, built once per run from what `GET /v1/model` publishes."""

    def __init__(self, seed: int, intrinsic_dim: int, prompt_length: int, hidden_size: int,
                 embedding_std: float, sigma0: float):
        self.prompt_length = prompt_length
        self.hidden_size = hidden_size
        self.std = projection_std(embedding_std, intrinsic_dim, sigma0)
        self.matrix = projection_matrix(seed, intrinsic_dim, prompt_length, hidden_size, self.std)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return project(z, self.matrix, self.prompt_length, self.hidden_size)
