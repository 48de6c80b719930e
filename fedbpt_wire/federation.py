"""Pydantic models of the aggregator's API: what a client and the aggregator exchange each round.

A round's download is the global search distribution (mean + step size, about 2 KB at d = 500) and
its upload the client's local distribution and fitness: kilobytes, never a model.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, Field, StringConstraints

from .schemas import Strict, Tensor
from .served import ServedChoice, ValidationComparison

# The strategy names: the aggregator maps each to its rules (aggregator.strategies.STRATEGY_CLASSES), its CLI
# offers them, the bench grid runs them; clients never read a name, only what a RoundTask tells them.
StrategyName = Literal["fedbpt", "fedbpt-noperturb", "fedavg-z", "centralized", "local-only"]
PromptInit = Literal["tokens", "random", "zeros"]
ProjectionBasis = Literal["normal", "embeddings"]
Placement = Literal["ahead", "after-text"]
SigmaRule = Literal["pooled", "paper-eq6"]
RobustMerge = Literal["none", "median", "trimmed-mean"]
FitnessBias = Literal["none", "fitted"]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
PROMPT_INITS: tuple[str, ...] = get_args(PromptInit)
PROJECTION_BASES: tuple[str, ...] = get_args(ProjectionBasis)
PLACEMENTS: tuple[str, ...] = get_args(Placement)
SIGMA_RULES: tuple[str, ...] = get_args(SigmaRule)
ROBUST_MERGES: tuple[str, ...] = get_args(RobustMerge)
# Counters a client reports: past 2**53 a float64 sum loses integers, and no real run comes near it.
MAX_COUNT = 2**53


class RunConfig(BaseModel):
    """Hyper-parameters of a run, fixed at the aggregator's start and handed to every client.

    Each field is declared once, here: its type, default and description become the flag of every front end that
    offers it (fedbpt_wire.options), the aggregator's `--config` file key and the Flower app's run-config key."""

    run_id: str = Field(description="run name")
    strategy: StrategyName = Field(
        default="fedbpt", description="how the aggregator merges the clients' search distributions"
    )
    rounds: int = Field(default=10, ge=1, description="federated rounds")
    intrinsic_dim: int = Field(default=500, ge=1, description="d, the dimension of z")
    prompt_length: int = Field(default=50, ge=1, description="L soft tokens")
    projection_seed: int = Field(default=0, description="seed of the random projection every client shares")
    prompt_init: PromptInit = Field(
        default="random",
        description="P0, the prompt at z = 0: 'tokens' the embeddings of vocabulary ids drawn from the projection "
        "seed (BBT; needs the seed + z wire form), 'random' normal vectors with the embeddings' std",
    )
    projection_basis: ProjectionBasis = Field(
        default="normal",
        description="A's rows: 'normal' (BBT's random normal) or 'embeddings', where each row moves each prompt "
        "position along a real token's centred embedding, drawn from the projection seed (needs the seed + z "
        "wire form: only the service holds the embedding table)",
    )
    prompt_placement: Placement = Field(
        default="ahead",
        description="where a causal LM's task template puts the soft prompt: 'ahead' of the text (BBT) or "
        "'after-text', before the cue line; every client must place it alike",
    )
    seed: int = Field(default=0, description="seed of the aggregator's search and client sampling")
    sigma0: float = Field(default=1.0, gt=0, description="the global CMA-ES's initial step size")
    local_popsize: int = Field(default=5, ge=2, description="candidates per local CMA-ES iteration")
    local_iterations: int = Field(default=8, ge=1, description="local CMA-ES iterations per client and round")
    perturb: bool = Field(
        default=True,
        description="FedBPT's fitness divides the loss by the loss on a perturbed copy of the batch "
        "(--no-perturb: fitness = loss)",
    )
    perturb_rate: float = Field(
        default=0.5, ge=0, le=1, description="chance that each word of the perturbed copy is swapped for a random one"
    )
    fitness_bias: FitnessBias = Field(
        default="none",
        description="'fitted': a client scores its candidates at one label bias per round, fitted on all its "
        "training examples at the global mean (logits it already scores for the round's metrics), so a "
        "candidate wins by separating the classes, not by shifting the label prior the served read-out corrects",
    )
    sigma_rule: SigmaRule = Field(
        default="pooled", description="how FedBPT merges the clients' step sizes into the global one"
    )
    local_sigma_floor: float = Field(
        default=0.5, ge=0, description="the step size a client's local search starts from never falls below this"
    )
    participation: float = Field(default=1.0, gt=0, le=1, description="fraction of clients sampled per round")
    min_clients: int = Field(default=1, ge=1, description="registered clients needed before round 0 opens")
    min_updates: int = Field(default=1, ge=1, description="updates needed to merge a round at its deadline")
    round_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="seconds a round waits for its selected clients",
        json_schema_extra={"flags": ["--round-timeout", "--round-timeout-s"]},
    )
    clip_multiple: float = Field(
        default=4.0,
        ge=0,
        description="a client's mean may lie at most clip_multiple x sigma x sqrt(d) from the global mean; "
        "farther ones are pulled back onto that sphere before the merge (0: no clipping)",
    )
    max_weight_ratio: float = Field(
        default=4.0,
        ge=1,
        description="fedavg-z: no client weighs more than this many times the round's median num_samples",
    )
    newcomer_rounds: int = Field(
        default=2,
        ge=0,
        description="an id registered after round 0 opened is new until it has reported in this many merged "
        "rounds; while new, its update is bounded by newcomer_clip (0: no newcomer bound)",
    )
    newcomer_clip: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="a new id's mean may lie at most this share of the clip radius from the global mean, and "
        "its step sizes not above the global ones: however many ids join late, they move the global mean at "
        "most that far in a round",
    )
    robust_merge: RobustMerge = Field(
        default="none",
        description="fedavg-z: the n-weighted mean ('none'), or the coordinate-wise median or "
        "trimmed mean of the clients' means and step sizes, unweighted",
    )


ClientName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class RegisterRequest(Strict):
    client_id: ClientName
    num_samples: int = Field(ge=0)


class RegisterResponse(BaseModel):
    client_id: str
    token: str
    config: RunConfig


class EnrollCodesRequest(Strict):
    """The operator asking for one-time enroll codes (`POST /v1/enroll-codes`)."""

    count: int = Field(ge=1, le=1000, description="codes to mint; each registers one new client id, once")


class EnrollCodes(BaseModel):
    codes: list[str]  # shown once: the aggregator keeps only their hashes


class PartitionClaim(Strict):
    """A client asking for its part K of N of a shared pool, where it was given no index (compose replicas)."""

    instance: ClientName = Field(description="stable across the client's restarts, e.g. its host name")
    parts: int = Field(ge=1, description="N")


class PartitionAssignment(BaseModel):
    index: int  # K, 0-based; the same one each time the same instance asks
    parts: int


class RoundTask(BaseModel):
    """What a client gets when it asks for work: the round's global distribution, or why there is none."""

    run_id: str
    round: int
    state: Literal["waiting", "open", "done"]
    selected: bool
    submitted: bool = False
    mean: Tensor | None = None  # [d]
    sigma: float | None = None  # global step size
    local_sigma: float | None = None  # step size the local CMA-ES starts from
    deadline_s: float | None = None  # seconds left in the round
    perturb: bool | None = Field(
        default=None,
        description="whether the local fitness divides by the loss on a perturbed copy of the batch, "
        "as the run's strategy decides (selected clients; absent from older aggregators)",
    )


class ClientCosts(Strict):
    queries: int = Field(ge=0, le=MAX_COUNT)
    sequences: int = Field(ge=0, le=MAX_COUNT)
    tokens: int = Field(ge=0, le=MAX_COUNT)
    service_bytes_up: int = Field(ge=0, le=MAX_COUNT)
    service_bytes_down: int = Field(ge=0, le=MAX_COUNT)


class ClientMetrics(Strict):
    local_loss: float
    local_accuracy: float
    global_val_loss: float | None = None  # the round's global mean on the local validation split
    global_val_accuracy: float | None = None
    val_samples: int = Field(default=0, ge=0)
    vs_baseline: ValidationComparison | None = Field(
        default=None,
        description="the round's global prompt against the manual prompt on the local validation split, each "
        "with its label bias fitted on the local training split (fedbpt_wire.served)",
    )


class UpdateRequest(Strict):
    round: int = Field(ge=0)
    mean: Tensor  # [d]
    fitness: float
    sigmas: list[float] = Field(
        min_length=1,
        max_length=10_000,
        description="the local step size each local iteration sampled its candidates with",
    )
    num_samples: int = Field(ge=0)
    final_sigma: float | None = Field(default=None, description="the local step size after the last iteration")
    metrics: ClientMetrics
    costs: ClientCosts


class UpdateResponse(BaseModel):
    accepted: bool
    duplicate: bool = False
    round: int


class RoundRecord(BaseModel):
    round: int
    state: Literal["open", "merged", "failed"]
    selected: list[str]
    reporters: list[str]
    sigma_before: float  # global step size handed to the round's clients
    sigma_after: float | None = None  # global step size after the merge
    local_sigma: float | None = None  # step size the clients' local CMA-ES started from (not local-only)
    sigma_merged: float | None = None  # FedBPT: the sigma rule's value, set on the global ES before its tell
    val_accuracy: float | None = None
    val_loss: float | None = None
    queries: int = 0
    sequences: int = 0
    tokens: int = 0
    service_bytes: int = 0  # client <-> service bodies, both ways, as the clients measured them
    service_bytes_up: int = 0  # of which client -> service
    service_bytes_down: int = 0
    bytes_up: int = 0  # client -> aggregator bodies, measured by the aggregator
    bytes_down: int = 0  # aggregator -> client bodies
    clipped: int | None = None  # updates the merge bounded (mean, step sizes or weight); operator only
    vs_baseline: ValidationComparison | None = Field(
        default=None, description="the reporters' comparisons pooled: the round's global prompt against the baseline"
    )
    opened_at: float
    closed_at: float | None = None


class ClientRoundRecord(BaseModel):
    """One accepted update: a client's costs and metrics in a round (operator only: `GET /v1/report/clients`)."""

    round: int
    client_id: str
    num_samples: int
    fitness: float
    local_loss: float
    local_accuracy: float
    global_val_loss: float | None = None
    global_val_accuracy: float | None = None
    val_samples: int = 0
    queries: int
    sequences: int
    tokens: int
    service_bytes_up: int
    service_bytes_down: int
    update_bytes: int = Field(
        description="the update's body as stored: this client's upload to the aggregator in the round, less its polls"
    )


class RunStatus(BaseModel):
    config: RunConfig
    state: Literal["waiting", "running", "done"]
    round: int
    clients: list[str]
    history: list[RoundRecord]
    redacted: bool = Field(
        default=False,
        description="client ids, selections and validation metrics left out: the caller did not show the operator key",
    )


class GlobalState(BaseModel):
    run_id: str
    round: int
    state: Literal["waiting", "running", "done"]
    mean: Tensor
    sigma: float
    client_means: dict[str, Tensor] | None = None  # local-only: each client's own prompt
    served: ServedChoice | None = Field(
        default=None,
        description="what the run serves so far: the best validated global prompt or the baseline "
        "(absent under local-only and from older aggregators)",
    )
