"""What the aggregator accepts from a client, as pure checks: each raises `Invalid` naming the field at fault.

Sanity bounds: past them a value is a client bug, and would overflow SQLite integers or the merge's squares.
"""

from __future__ import annotations

import math

from fedbpt_wire.federation import RunConfig, UpdateRequest
from fedbpt_wire.tensors import TensorDecodeError, decode_tensor

MAX_SAMPLES = 10**12
MAX_PARTS = 10**6
MAX_SIGMA_RATIO = 1e6  # a local step size over 1e6 x sigma0; CMA-ES grows sigma at most ~e per iteration
MAX_METRIC = 1e12  # |loss| or accuracy; times val_samples (<= MAX_SAMPLES) the round's weighted sums stay finite


class Invalid(ValueError):
    """A value the run cannot accept; the message names the field."""


def check_samples(value: int, field: str = "num_samples") -> None:
    if value > MAX_SAMPLES:
        raise Invalid(f"{field} must be at most {MAX_SAMPLES}, got {value}")


def check_parts(parts: int) -> None:
    if parts > MAX_PARTS:
        raise Invalid(f"parts must be at most {MAX_PARTS}, got {parts}")


def _check_step_size(value: float, field: str, cap: float) -> None:
    if not (math.isfinite(value) and 0 < value <= cap):
        raise Invalid(f"{field} must be positive and at most {cap:g}, got {value}")


def _check_metric(value: float, field: str) -> None:
    if not (math.isfinite(value) and abs(value) <= MAX_METRIC):
        raise Invalid(f"{field} must be finite and within +-{MAX_METRIC:g}, got {value}")


def check_update(req: UpdateRequest, config: RunConfig) -> None:
    """The update's shape, finiteness and bounds against the run's config."""
    d = config.intrinsic_dim
    try:
        mean = decode_tensor(req.mean, field="mean", max_elements=d)
    except TensorDecodeError as exc:
        raise Invalid(str(exc)) from None
    if list(mean.shape) != [d]:
        raise Invalid(f"mean.shape must be [{d}] (intrinsic_dim), got {req.mean.shape}")
    _check_metric(req.fitness, "fitness")
    if len(req.sigmas) > config.local_iterations:
        raise Invalid(
            f"sigmas: one step size per local iteration, at most {config.local_iterations} "
            f"(local_iterations), got {len(req.sigmas)}"
        )
    cap = MAX_SIGMA_RATIO * config.sigma0
    for i, s in enumerate(req.sigmas):
        _check_step_size(s, f"sigmas[{i}]", cap)
    if req.final_sigma is not None:
        _check_step_size(req.final_sigma, "final_sigma", cap)
    check_samples(req.num_samples)
    # Checked here, not at the merge: a value the round's metrics cannot fold would fail every close of
    # the round, and so every request after it.
    check_samples(req.metrics.val_samples, "metrics.val_samples")
    for name, value in req.metrics:
        if isinstance(value, float):
            _check_metric(value, f"metrics.{name}")
    comparison = req.metrics.vs_baseline
    if comparison is not None:
        problem = comparison.consistency_error()
        if problem is not None:
            raise Invalid(f"metrics.vs_baseline: {problem}")
        for name in ("tuned_loss", "baseline_loss"):
            _check_metric(getattr(comparison, name), f"metrics.vs_baseline.{name}")
