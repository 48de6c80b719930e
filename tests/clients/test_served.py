"""The served prompt's rule (fedbpt_wire.served) and the client's calibrated comparison (fed_clients.evaluation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from fed_clients.evaluation import calibrated_comparison, mcnemar_exact
from fedbpt_wire import served
from fedbpt_wire.served import SIGNIFICANCE, ValidationComparison, choose, mcnemar_p, min_detectable_gain, pool


def comparison(examples, tuned_correct, baseline_correct, tuned_only, baseline_only, tuned_loss=0.5, base_loss=0.6):
    return ValidationComparison(
        examples=examples,
        tuned_loss=tuned_loss,
        tuned_correct=tuned_correct,
        baseline_loss=base_loss,
        baseline_correct=baseline_correct,
        tuned_only=tuned_only,
        baseline_only=baseline_only,
    )


def test_mcnemar_from_counts_is_the_exact_binomial_test():
    # n = 10 discordant, 2 one way: 2 * (C(10,0) + C(10,1) + C(10,2)) / 2**10
    assert mcnemar_p(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_p(8, 2) == mcnemar_p(2, 8)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    # Pooled counts in the thousands stay finite and in (0, 1].
    assert 0.0 < mcnemar_p(1200, 1000) < 0.01
    # Past EXACT_UP_TO discordant examples the normal approximation, close to the exact tail and O(1): a client's
    # claimed counts cannot make the aggregator sum 10**11 terms.
    approximate = mcnemar_p(10_250, 9_750)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(served, "EXACT_UP_TO", 10**6)
        assert approximate == pytest.approx(mcnemar_p(10_250, 9_750), rel=1e-3)
    assert mcnemar_p(5 * 10**11, 5 * 10**11) == 1.0 and mcnemar_p(10**11, 0) == 0.0
    a = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 1], bool)
    b = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0], bool)
    assert mcnemar_exact(a, b) == mcnemar_p(6, 1)


def test_the_smallest_detectable_gain_shrinks_with_validation_size():
    # Six discordant examples all one way are the fewest that reach p < 0.05 (2 / 2**6 = 0.031; 2 / 2**5 = 0.0625).
    assert min_detectable_gain(20) == pytest.approx(6 / 20)
    assert min_detectable_gain(600) == pytest.approx(6 / 600)
    assert min_detectable_gain(5) is None


def test_counts_that_cannot_all_be_true_are_named():
    assert comparison(10, 7, 6, 2, 1).consistency_error() is None
    assert "exceeds examples" in comparison(10, 11, 6, 5, 0).consistency_error()
    assert "both right" in comparison(10, 7, 6, 3, 1).consistency_error()
    assert comparison(10, 8, 8, 2, 2).consistency_error() is None
    assert "more examples" in comparison(10, 9, 9, 3, 3).consistency_error()
    with pytest.raises(ValidationError, match="tuned_correct"):
        comparison(10, -1, 6, 0, 0)
    with pytest.raises(ValidationError, match="extra"):
        ValidationComparison.model_validate({**comparison(10, 7, 6, 2, 1).model_dump(), "labels": [1, 0]})


def test_pool_sums_counts_and_weights_losses_by_examples():
    a = comparison(10, 7, 6, 2, 1, tuned_loss=0.2, base_loss=0.4)
    b = comparison(30, 20, 20, 3, 3, tuned_loss=0.6, base_loss=0.8)
    p = pool([a, b, comparison(0, 0, 0, 0, 0)])
    assert (p.examples, p.tuned_correct, p.baseline_correct, p.tuned_only, p.baseline_only) == (40, 27, 26, 5, 4)
    assert p.tuned_loss == pytest.approx((0.2 * 10 + 0.6 * 30) / 40)
    assert p.baseline_loss == pytest.approx((0.4 * 10 + 0.8 * 30) / 40)
    assert pool([]) is None


def test_the_tuned_prompt_is_served_only_when_validation_shows_it_better():
    clear_win = comparison(400, 340, 300, 45, 5, tuned_loss=0.40)
    within_noise = comparison(400, 305, 300, 15, 10, tuned_loss=0.30)  # lowest loss, but p ~ 0.4
    worse = comparison(400, 280, 300, 5, 25, tuned_loss=0.55)

    best, choice = choose({0: worse, 1: clear_win})
    assert best == 1 and choice.served == "tuned" and choice.distinguishable
    assert choice.p_value < SIGNIFICANCE and "beats the baseline" in choice.reason

    # The candidate is the lowest-loss round; it loses to the baseline when it cannot be told apart.
    best, choice = choose({0: worse, 1: clear_win, 2: within_noise})
    assert best == 2 and choice.served == "baseline" and not choice.distinguishable
    assert "cannot tell the two apart" in choice.reason

    best, choice = choose({0: worse})
    assert choice.served == "baseline" and choice.distinguishable and "baseline beats" in choice.reason


def test_validation_too_small_to_choose_with_says_so():
    best, choice = choose({3: comparison(4, 4, 0, 4, 0)})  # every example in the tuned prompt's favour
    assert best == 3 and choice.served == "baseline" and choice.min_detectable_gain is None
    assert "too small" in choice.reason
    best, choice = choose({})
    assert best is None and choice.served == "baseline" and "no tuned prompt" in choice.reason


def test_calibrated_comparison_fits_each_bias_on_train_and_scores_validation():
    rng = np.random.default_rng(0)
    train_labels = rng.integers(0, 2, 200)
    val_labels = rng.integers(0, 2, 300)

    def logits(labels, separation, prior):
        gap = separation * (2 * labels - 1) + prior + rng.normal(0, 1, len(labels))
        return np.stack([np.zeros(len(labels)), gap], axis=1)

    # The baseline: weakly separating and badly biased (a label prior a bias fits); the tuned prompt separates.
    base_train, base_val = logits(train_labels, 0.3, -3.0), logits(val_labels, 0.3, -3.0)
    tuned_train, tuned_val = logits(train_labels, 2.0, 0.0), logits(val_labels, 2.0, 0.0)
    c = calibrated_comparison(tuned_train, tuned_val, base_train, base_val, train_labels, val_labels)
    assert c.consistency_error() is None and c.examples == 300
    assert c.tuned_correct > c.baseline_correct and c.tuned_loss < c.baseline_loss
    # The baseline, calibrated, does better than its raw argmax (which predicts one class throughout).
    assert c.baseline_correct > (base_val.argmax(-1) == val_labels).sum()
    assert math.isfinite(c.p_value) and c.p_value < SIGNIFICANCE

    same = calibrated_comparison(base_train, base_val, base_train, base_val, train_labels, val_labels)
    assert same.tuned_only == same.baseline_only == 0 and same.tuned_correct == same.baseline_correct
