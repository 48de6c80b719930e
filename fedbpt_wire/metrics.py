"""Loss and accuracy over label-word logits: the fitness every party computes the same way."""

from __future__ import annotations

import numpy as np


def label_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean cross-entropy and accuracy per prompt of logits [P, N, C] against labels [N].

    The label-word logits are renormalised over the C classes (a softmax over C, not the vocabulary).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=-1))
    picked = np.take_along_axis(shifted, labels[None, :, None].repeat(logits.shape[0], 0), axis=-1)[..., 0]
    loss = (log_norm - picked).mean(axis=-1)
    accuracy = (logits.argmax(axis=-1) == labels[None, :]).mean(axis=-1)
    return loss, accuracy


def debiased_cross_entropy(
    logits: np.ndarray, labels: np.ndarray, ridge: float = 1e-3, steps: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-entropy per prompt at the best label bias for it, and that bias: ([P], [P, C]).

    min over b of mean CE(logits + b, labels) + ridge/2 |b|^2: convex in b, solved by Newton's method with a
    backtracking line search (a plain Newton step overshoots where the softmax saturates); the ridge keeps b
    finite when a batch holds one class. A search that ranks prompts by this cannot win by shifting the label
    prior, which a calibrated read-out fixes for free, only by separating the classes.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    p_count, n, c = logits.shape
    onehot = np.eye(c)[labels]
    eye = np.eye(c)

    def objective(bias: np.ndarray) -> np.ndarray:  # bias [..., P, C] -> [..., P]
        z = logits + bias[..., None, :]
        top = z.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(z - top).sum(axis=-1)) + top[..., 0]
        return (log_norm - (z * onehot).sum(axis=-1)).mean(axis=-1) + 0.5 * ridge * (bias**2).sum(axis=-1)

    bias = np.zeros((p_count, c))
    value = objective(bias)
    scales = 0.5 ** np.arange(12)
    for _ in range(steps):
        z = logits + bias[:, None, :]
        probs = np.exp(z - z.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        grad = (probs - onehot[None]).mean(axis=1) + ridge * bias
        hess = (np.einsum("pnc,cd->pcd", probs, eye) - np.einsum("pnc,pnd->pcd", probs, probs)) / n + ridge * eye
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        trials = bias[None] - scales[:, None, None] * step[None]  # [S, P, C]
        values = objective(trials)
        best = values.argmin(axis=0)
        best_values = values[best, np.arange(p_count)]
        improved = best_values < value
        bias = np.where(improved[:, None], trials[best, np.arange(p_count)], bias)
        gain = np.where(improved, value - best_values, 0.0)
        value = np.minimum(value, best_values)
        if gain.max() < 1e-12:
            break
    return value, bias
