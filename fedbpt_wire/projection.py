"""The fixed random projection z in R^d -> soft prompt [L, D], drawn from a seed every client shares.

Pure NumPy and shared by both ends of the wire: clients project z themselves, and the service expands
a request sent in the compact seed + z form with these same functions, bit for bit.
"""

from __future__ import annotations

import numpy as np

from .federation import PROJECTION_BASES, PROMPT_INITS
from .schemas import ProjectionSpec


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


def initial_prompt(seed: int, prompt_length: int, hidden_size: int, embedding_std: float) -> np.ndarray:
    """P0 [L, D]: normal with the word embeddings' std, from its own stream of the projection seed.

    A causal LM without a BOS token reads the soft prompt first; all-zero vectors there take the place
    of the attention sink and cost SmolLM2-135M about 8 points of zero-shot accuracy, while embedding-like
    random vectors cost about 1. BBT likewise starts from a non-zero prompt.
    """
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    return rng.standard_normal((prompt_length, hidden_size), dtype=np.float32) * np.float32(embedding_std)


def initial_token_ids(seed: int, prompt_length: int, vocab_size: int) -> np.ndarray:
    """The L vocabulary ids whose embeddings make P0 under init 'tokens', from their own stream of the seed.

    BBT adds A z to the embeddings of real tokens: a prompt that starts as words the model has seen sits
    where the model expects its inputs, which random vectors (init 'random') only imitate in scale.
    """
    rng = np.random.Generator(np.random.PCG64([seed, 2]))
    return rng.integers(0, vocab_size, size=prompt_length, dtype=np.int64)


def embedding_basis(
    seed: int, intrinsic_dim: int, prompt_length: int, hidden_size: int, std: float, token_embeddings, vocab_size: int
) -> np.ndarray:
    """A [d, L*D] float32 matrix whose row i moves prompt position l along the embedding of a vocabulary id drawn
    from its own stream of the seed, centred on the mean of 4,096 more and scaled to the normal basis's entry std.

    The rows share the embedding table's covariance, so z explores the directions real inputs vary in rather than
    all of R^D alike; only the model owner holds the table (`token_embeddings`: ids -> [n, D]).
    """
    rng = np.random.Generator(np.random.PCG64([seed, 3]))
    centre = np.asarray(token_embeddings(rng.integers(0, vocab_size, 4096)), dtype=np.float32).mean(axis=0)
    ids = rng.integers(0, vocab_size, intrinsic_dim * prompt_length)
    rows = np.asarray(token_embeddings(ids), dtype=np.float32) - centre
    rows *= std / rows.std()
    return rows.reshape(intrinsic_dim, prompt_length * hidden_size)


class Projection:
    """P = P0 + A z with A and P0 drawn from the shared seed, built from what `GET /v1/model` publishes.

    Init 'tokens' takes P0, and basis 'embeddings' takes A, from the model's embedding table, which only the
    service holds: `token_embeddings` (ids -> [n, D]) is the service's; a client builds such a projection for its
    spec and the seed + z wire form (`service_only`), and cannot expand z into prompts itself.
    """

    def __init__(
        self,
        seed: int,
        intrinsic_dim: int,
        prompt_length: int,
        hidden_size: int,
        embedding_std: float,
        sigma0: float,
        init: str = "random",
        token_embeddings=None,
        vocab_size: int | None = None,
        basis: str = "normal",
    ):
        if init not in PROMPT_INITS:
            raise ValueError(f"prompt init must be one of {', '.join(PROMPT_INITS)}, got {init!r}")
        if basis not in PROJECTION_BASES:
            raise ValueError(f"projection basis must be one of {', '.join(PROJECTION_BASES)}, got {basis!r}")
        # What a service needs, besides the model it already has, to rebuild this projection from a seed; the
        # normal basis leaves `basis` out, so services from before the field read the spec as they always did.
        self.spec = ProjectionSpec(
            seed=seed,
            prompt_length=prompt_length,
            sigma0=sigma0,
            init=init,
            basis=None if basis == "normal" else basis,
        )
        self.intrinsic_dim = intrinsic_dim
        self.prompt_length = prompt_length
        self.hidden_size = hidden_size
        self.std = projection_std(embedding_std, intrinsic_dim, sigma0)
        self.matrix: np.ndarray | None = None
        if basis == "normal":
            self.matrix = projection_matrix(seed, intrinsic_dim, prompt_length, hidden_size, self.std)
        elif token_embeddings is not None:
            if vocab_size is None:
                raise ValueError("projection basis 'embeddings' needs the model's vocabulary size")
            self.matrix = embedding_basis(
                seed, intrinsic_dim, prompt_length, hidden_size, self.std, token_embeddings, vocab_size
            )
        self.offset: np.ndarray | None
        if init == "tokens":
            self.offset = None
            if token_embeddings is not None:
                if vocab_size is None:
                    raise ValueError("prompt init 'tokens' needs the model's vocabulary size")
                ids = initial_token_ids(seed, prompt_length, vocab_size)
                self.offset = np.asarray(token_embeddings(ids), dtype=np.float32).reshape(prompt_length, hidden_size)
        elif init == "random":
            self.offset = initial_prompt(seed, prompt_length, hidden_size, embedding_std)
        else:
            self.offset = np.zeros((prompt_length, hidden_size), np.float32)

    @property
    def service_only(self) -> bool:
        """Whether z needs the model's embedding table to become prompts (init 'tokens', basis 'embeddings')."""
        return self.offset is None or self.matrix is None

    def __call__(self, z: np.ndarray) -> np.ndarray:
        if self.offset is None or self.matrix is None:
            raise ValueError(
                "prompt init 'tokens' and projection basis 'embeddings' draw on the model's own embeddings, which "
                "only the service holds: send z in the seed + z wire form and let the service expand it"
            )
        return project(z, self.matrix, self.prompt_length, self.hidden_size) + self.offset


def projection_from_spec(
    spec: ProjectionSpec,
    intrinsic_dim: int,
    hidden_size: int,
    embedding_std: float,
    token_embeddings=None,
    vocab_size: int | None = None,
) -> Projection:
    return Projection(
        spec.seed,
        intrinsic_dim,
        spec.prompt_length,
        hidden_size,
        embedding_std,
        spec.sigma0,
        spec.init,
        token_embeddings,
        vocab_size,
        spec.basis or "normal",
    )


def projection_for(config, info) -> Projection:
    """The run's projection (a RunConfig) for the served model (a ModelInfo): the same on every client."""
    return Projection(
        config.projection_seed,
        config.intrinsic_dim,
        config.prompt_length,
        info.hidden_size,
        info.embedding_std,
        config.sigma0,
        config.prompt_init,
        basis=config.projection_basis,
    )
