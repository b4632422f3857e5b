"""Scores from logits: the top classes of each row and the softmax, one way for every
answer (top-k with probabilities) and for the shadow's comparisons."""

from __future__ import annotations

import numpy as np


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first (ties: lower index first).

    A few of many classes (top-5 of 1000) are found by partition and only the scores at
    or above the k-th are sorted (stably, so ties keep index order): sorting the whole row
    cost twice the rest of an answer's shaping. A row with NaN (which a partition cannot
    order) or a k near the row's length sorts the whole row."""
    n = scores.shape[1]
    if k * 8 >= n or np.isnan(scores).any():
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.empty((len(scores), k), dtype=np.intp)
    for r, row in enumerate(scores):
        chosen = np.flatnonzero(row >= np.partition(row, n - k)[n - k])  # k, or more on ties
        out[r] = chosen[np.argsort(-row[chosen], kind="stable")[:k]]
    return out


def probabilities(logits: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The softmax of each row of ``logits`` at that row's ``idx`` (as top_indices gives
    them): every class's exponent is needed for the sum, only these are divided."""
    exp = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return np.take_along_axis(exp, idx, axis=1) / exp.sum(axis=1, keepdims=True)
