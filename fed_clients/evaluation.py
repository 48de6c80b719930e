"""Held-out evaluation beside honest baselines: calibrated zero-shot and McNemar's paired test.

A calibrated zero-shot classifier is what any data owner can build without tuning: score the manual prompt
on their own labelled examples and correct its label bias. A tuned prompt earns its cost only where it
beats that, on the same test examples, by more than chance (the paired test).
"""

from __future__ import annotations

import numpy as np

from fedbpt_wire.metrics import label_cross_entropy
from fedbpt_wire.served import ValidationComparison, mcnemar_p


def fit_calibration(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A bias [C] added to label-word logits [N, C], fitted on labelled examples.

    Two classes: the threshold on the logit gap that classifies the examples best (the middle of the best
    interval, so it does not hug one example). More classes: contextual calibration with real inputs, the
    mean log-probability of each label word subtracted, which removes the prompt's prior over the words.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need logits [N, C] and N labels, got {logits.shape} and {labels.shape}")
    n_classes = logits.shape[1]
    if n_classes != 2:
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -log_probs.mean(axis=0)
    gap = logits[:, 1] - logits[:, 0]
    cuts = np.unique(gap)
    candidates = np.concatenate([[cuts[0] - 1.0], (cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1.0]])
    # Predict class 1 where gap > t: accuracy of every candidate threshold at once.
    correct = ((gap[None, :] > candidates[:, None]) == (labels[None, :] == 1)).sum(axis=1)
    best = np.flatnonzero(correct == correct.max())
    threshold = (candidates[best[0]] + candidates[best[-1]]) / 2
    return np.array([0.0, -threshold])


def calibrated_predictions(logits: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return (np.asarray(logits, dtype=np.float64) + bias).argmax(axis=-1)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value that two classifiers are equally accurate on the same examples."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired results must have the same shape, got {a.shape} and {b.shape}")
    return mcnemar_p(int((a & ~b).sum()), int((~a & b).sum()))


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of a metric over seeds."""
    arr = np.asarray(list(values), dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro-F1 (a class never predicted nor present counts 0) and the confusion matrix
    (rows: true class, columns: predicted)."""
    confusion = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(confusion, (labels, predictions), 1)
    tp = np.diag(confusion).astype(float)
    denom = confusion.sum(0) + confusion.sum(1)
    f1 = np.divide(2 * tp, denom, out=np.zeros(num_classes), where=denom > 0)
    return {
        "examples": int(len(labels)),
        "accuracy": float((labels == predictions).mean()) if len(labels) else 0.0,
        "macro_f1": float(f1.mean()),
        "f1": f1.tolist(),
        "confusion": confusion.tolist(),
    }


def calibrated_comparison(
    tuned_train: np.ndarray,
    tuned_val: np.ndarray,
    baseline_train: np.ndarray,
    baseline_val: np.ndarray,
    train_labels: np.ndarray,
    val_labels: np.ndarray,
) -> ValidationComparison:
    """The tuned prompt against the baseline on validation examples, each with its bias fitted on the training
    examples (label-word logits [N, C] of each prompt on each split)."""
    val_labels = np.asarray(val_labels, dtype=np.int64)
    results = []
    for train, val in ((tuned_train, tuned_val), (baseline_train, baseline_val)):
        bias = fit_calibration(train, train_labels)
        shifted = np.asarray(val, dtype=np.float64) + bias
        loss, _ = label_cross_entropy(shifted[None], val_labels)
        results.append((float(loss[0]), shifted.argmax(-1) == val_labels))
    (tuned_loss, tuned_ok), (base_loss, base_ok) = results
    return ValidationComparison(
        examples=len(val_labels),
        tuned_loss=tuned_loss,
        tuned_correct=int(tuned_ok.sum()),
        baseline_loss=base_loss,
        baseline_correct=int(base_ok.sum()),
        tuned_only=int((tuned_ok & ~base_ok).sum()),
        baseline_only=int((~tuned_ok & base_ok).sum()),
    )
