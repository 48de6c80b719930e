"""Which prompt a run hands a user to deploy: the best tuned global prompt, or the baseline, on held-out data.

The baseline is what a user has without tuning: the manual prompt (the template alone, an empty soft prompt)
with its label bias fitted on their own labelled examples. A tuned prompt is judged the same way, with its own
fitted bias, on the same validation examples, so a prompt wins only by separating the classes better, never by
learning a label prior that a bias fits for free.

Clients compare the two on their validation split each round and report counts (`ValidationComparison`); the
aggregator pools them per round (`pool`) and `choose` picks: the round whose global prompt had the lowest pooled
loss is the tuned candidate, and it is served only where it is more accurate than the baseline by more than
chance (exact McNemar on the paired validation examples). The same function decides on one client's own
validation split where no aggregator decided (an older aggregator, `local-only`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, Field

from .schemas import Strict, Tensor

# A tuned prompt is served only where the paired test on validation rejects "as accurate as the baseline".
SIGNIFICANCE = 0.05
# Counts a client reports: far past any real validation split, low enough that sums stay exact in float64.
MAX_EXAMPLES = 10**12


# Past this many discordant examples the binomial tail is summed no more: the normal approximation (with continuity
# correction) is then within ~1e-3 of it, and a client's counts must not buy an O(n) loop on the aggregator.
EXACT_UP_TO = 10_000


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided McNemar p-value from the discordant counts (examples only A got right, only B got right): exact
    binomial up to EXACT_UP_TO discordant examples, the normal approximation beyond."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    if n > EXACT_UP_TO:
        z = (abs(only_a - only_b) - 1) / math.sqrt(n)
        return min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))
    # log-space binomial tail: pooled counts reach the thousands, where 2**n overflows a float.
    log_half_n = n * math.log(0.5)
    log_n = math.lgamma(n + 1)
    tail = sum(math.exp(log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n) for i in range(k + 1))
    return min(1.0, 2 * tail)


def min_detectable_gain(examples: int, alpha: float = SIGNIFICANCE) -> float | None:
    """The smallest accuracy gain over the baseline that `examples` validation examples can show at `alpha`:
    every discordant example in the tuned prompt's favour. None where no gain could be significant."""
    for k in range(1, examples + 1):
        if mcnemar_p(k, 0) < alpha:
            return k / examples
    return None


class ValidationComparison(Strict):
    """The tuned global prompt against the baseline on validation examples, each read out with its label bias
    fitted on the training split of the client that holds the examples. Counts and summed losses only: no
    example and no label leaves a client."""

    examples: int = Field(ge=0, le=MAX_EXAMPLES)
    tuned_loss: float = Field(ge=0, description="mean cross-entropy of the tuned prompt, its bias applied")
    tuned_correct: int = Field(ge=0, le=MAX_EXAMPLES)
    baseline_loss: float = Field(ge=0, description="mean cross-entropy of the manual prompt, its bias applied")
    baseline_correct: int = Field(ge=0, le=MAX_EXAMPLES)
    tuned_only: int = Field(
        ge=0, le=MAX_EXAMPLES, description="examples the tuned prompt gets right, the baseline wrong"
    )
    baseline_only: int = Field(ge=0, le=MAX_EXAMPLES, description="examples only the baseline gets right")

    def consistency_error(self) -> str | None:
        """Why the counts cannot all be true (None where they can): the aggregator refuses such a report."""
        for name in ("tuned_correct", "baseline_correct"):
            if getattr(self, name) > self.examples:
                return f"{name} ({getattr(self, name)}) exceeds examples ({self.examples})"
        if self.tuned_correct - self.tuned_only != self.baseline_correct - self.baseline_only:
            return "tuned_correct - tuned_only must equal baseline_correct - baseline_only (both right)"
        if self.tuned_only > self.tuned_correct or self.baseline_only > self.baseline_correct:
            return "tuned_only and baseline_only cannot exceed the correct counts"
        if self.tuned_correct + self.baseline_only > self.examples:
            return "more examples right by either prompt than examples"
        return None

    @property
    def tuned_accuracy(self) -> float:
        return self.tuned_correct / self.examples if self.examples else 0.0

    @property
    def baseline_accuracy(self) -> float:
        return self.baseline_correct / self.examples if self.examples else 0.0

    @property
    def p_value(self) -> float:
        return mcnemar_p(self.tuned_only, self.baseline_only)


def pool(reports: Iterable[ValidationComparison]) -> ValidationComparison | None:
    """Several clients' comparisons as one over all their examples (losses weighted by examples)."""
    reports = [r for r in reports if r.examples > 0]
    if not reports:
        return None
    n = sum(r.examples for r in reports)
    return ValidationComparison(
        examples=n,
        tuned_loss=sum(r.tuned_loss * r.examples for r in reports) / n,
        tuned_correct=sum(r.tuned_correct for r in reports),
        baseline_loss=sum(r.baseline_loss * r.examples for r in reports) / n,
        baseline_correct=sum(r.baseline_correct for r in reports),
        tuned_only=sum(r.tuned_only for r in reports),
        baseline_only=sum(r.baseline_only for r in reports),
    )


class ServedChoice(BaseModel):
    """What a run serves, and why; part of `GET /v1/global` and of the prompt file."""

    served: Literal["tuned", "baseline"]
    round: int | None = Field(
        default=None, description="the round whose global prompt is the tuned candidate (its mean is `mean`)"
    )
    mean: Tensor | None = Field(default=None, description="the tuned candidate's z")
    validation: ValidationComparison | None = Field(
        default=None, description="the tuned candidate against the baseline on the same validation examples"
    )
    p_value: float | None = None
    distinguishable: bool = Field(
        default=False, description="whether validation could tell the two apart (p below the significance level)"
    )
    min_detectable_gain: float | None = Field(
        default=None, description="the smallest accuracy gain this validation could show to be significant"
    )
    reason: str = ""


def choose(candidates: dict[int, ValidationComparison]) -> tuple[int | None, ServedChoice]:
    """The served prompt among validated tuned candidates (round -> pooled comparison) and the baseline.

    Returns the candidate round (None where none was validated) and the choice, without its mean (the caller
    holds the means).
    """
    usable = {r: c for r, c in candidates.items() if c.examples > 0}
    if not usable:
        return None, ServedChoice(
            served="baseline", reason="no tuned prompt was validated: serving the baseline (manual prompt + bias)"
        )
    best = min(usable, key=lambda r: (usable[r].tuned_loss, r))
    v = usable[best]
    p = v.p_value
    gain = min_detectable_gain(v.examples)
    better = v.tuned_correct > v.baseline_correct
    distinguishable = p < SIGNIFICANCE
    tuned = better and distinguishable
    acc = f"tuned {v.tuned_accuracy:.3f} vs baseline {v.baseline_accuracy:.3f} on {v.examples} validation examples"
    if tuned:
        reason = f"the tuned prompt of round {best} beats the baseline: {acc}, McNemar p {p:.2g}"
    elif distinguishable:
        reason = f"the baseline beats the best tuned prompt (round {best}): {acc}, McNemar p {p:.2g}"
    elif gain is None:
        reason = (
            f"validation too small to tell the two apart ({v.examples} examples cannot show any gain at p < "
            f"{SIGNIFICANCE}): {acc}; serving the baseline"
        )
    else:
        reason = (
            f"validation cannot tell the two apart ({acc}, McNemar p {p:.2g}; {v.examples} examples show only "
            f"gains of {100 * gain:.0f} points or more): serving the baseline"
        )
    return best, ServedChoice(
        served="tuned" if tuned else "baseline",
        round=best,
        validation=v,
        p_value=p,
        distinguishable=distinguishable,
        min_detectable_gain=gain,
        reason=reason,
    )
