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
