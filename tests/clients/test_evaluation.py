"""The baselines and statistics every accuracy claim is reported with, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fed_clients.evaluation import calibrated_predictions, fit_calibration, mcnemar_exact, mean_std
from fed_clients.local_search import local_search


def test_binary_calibration_is_the_best_threshold_on_the_logit_gap():
    # gaps (l1 - l0): -3 -2 -1 | 0.5 1 2 for labels 0 0 1 | 1 1 1: a model biased to class 0 at threshold 0.
    gaps = np.array([-3.0, -2.0, -1.0, 0.5, 1.0, 2.0])
    labels = np.array([0, 0, 1, 1, 1, 1])
    logits = np.stack([np.zeros(6), gaps], axis=1)
    assert (logits.argmax(1) == labels).mean() == pytest.approx(5 / 6)
    bias = fit_calibration(logits, labels)
    # Every threshold in (-2, -1) classifies all six right; the middle of that interval is -1.5.
    assert bias == pytest.approx([0.0, 1.5])
    assert (calibrated_predictions(logits, bias) == labels).all()
    # Shifting every logit of a class by a constant does not change what the calibrated classifier does.
    shifted = logits + np.array([4.0, 0.0])
    np.testing.assert_array_equal(
        calibrated_predictions(shifted, fit_calibration(shifted, labels)), calibrated_predictions(logits, bias)
    )


def test_multiclass_calibration_removes_the_mean_log_probability():
    logits = np.array([[2.0, 0.0, 0.0], [1.0, 0.0, -1.0]])
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(fit_calibration(logits, np.array([0, 1])), -log_probs.mean(0))
    with pytest.raises(ValueError, match="logits"):
        fit_calibration(logits, np.array([0]))


def test_mcnemar_exact_matches_the_binomial_tail():
    a = np.array([True] * 6 + [False] * 4 + [True] * 10)
    b = np.array([False] * 6 + [True] * 4 + [True] * 10)
    # 6 discordant pairs one way, 4 the other: p = 2 * P(X <= 4), X ~ Bin(10, 1/2).
    expected = 2 * sum(math.comb(10, k) for k in range(5)) / 2**10
    assert mcnemar_exact(a, b) == pytest.approx(expected)
    assert mcnemar_exact(b, a) == pytest.approx(expected)
    assert mcnemar_exact(np.ones(5, bool), np.zeros(5, bool)) == pytest.approx(2 / 32)
    assert mcnemar_exact(a, a) == 1.0
    with pytest.raises(ValueError, match="same shape"):
        mcnemar_exact(a, a[:3])


def test_mean_std_is_over_seeds_with_the_sample_deviation():
    assert mean_std([0.7, 0.8, 0.9]) == (pytest.approx(0.8), pytest.approx(0.1))
    assert mean_std([0.5]) == (0.5, 0.0)


def test_local_search_reports_the_step_size_each_iteration_sampled_with():
    """As the FedBPT reference: sigma recorded before each ask (the first is the start), the final one apart."""
    result = local_search(lambda z, it: (z**2).sum(1), np.ones(6), 0.7, popsize=6, iterations=4, seed=3)
    assert len(result.sigmas) == 4 and result.sigmas[0] == 0.7
    assert result.final_sigma != result.sigmas[-1] and result.final_sigma > 0
    assert result.evaluations == 24


def test_debiased_cross_entropy_is_the_loss_at_the_best_label_bias():
    from fedbpt_wire.metrics import debiased_cross_entropy, label_cross_entropy

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 16)
    scale = np.array([1.0, 10.0, 100.0])[:, None, None]
    # The last prompt's logits are so far apart that a plain Newton step on the bias overshoots.
    logits = (rng.normal(size=(3, 16, 2)) + np.array([0.0, 3.0])) * scale
    loss, bias = debiased_cross_entropy(logits, labels, ridge=1e-3)
    for p in range(3):
        # Two classes: only the gap t = b1 - b0 moves the loss, and the ridge is least at b = (-t/2, t/2).
        gaps = np.linspace(-2000.0, 2000.0, 400_001)
        gap_logits = logits[p, :, 1][None, :] + gaps[:, None] - logits[p, :, 0][None, :]
        ce = np.logaddexp(0.0, gap_logits) - np.where(labels == 1, gap_logits, 0.0)
        brute = (ce.mean(axis=1) + 1e-3 * gaps**2 / 4).min()
        assert loss[p] == pytest.approx(brute, abs=1e-4)
        assert loss[p] == pytest.approx(
            label_cross_entropy(logits[p : p + 1] + bias[p], labels)[0][0] + 0.5e-3 * (bias[p] ** 2).sum()
        )


def test_debiased_cross_entropy_ignores_a_label_prior_but_not_the_ranking():
    from fedbpt_wire.metrics import debiased_cross_entropy

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, 40)
    separating = np.eye(4)[labels] * 2.0 + rng.normal(size=(40, 4))
    logits = np.stack([separating, rng.normal(size=(40, 4))])
    loss, _ = debiased_cross_entropy(logits, labels)
    assert loss[0] < loss[1]
    # A prior over the label words (the same shift on every example) is what the bias absorbs.
    shifted, _ = debiased_cross_entropy(logits + np.array([5.0, -2.0, 0.0, 1.0]), labels)
    np.testing.assert_allclose(shifted, loss, atol=0.02)
