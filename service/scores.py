"""Scores from logits: the top classes of each row and the softmax, one way for every
answer (top-k with probabilities) and for the shadow's comparisons."""

from __future__ import annotations

import numpy as np


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first (ties: lower index first)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(z)
    return probs / probs.sum(axis=1, keepdims=True)
