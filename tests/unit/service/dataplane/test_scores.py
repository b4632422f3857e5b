"""Top-k and probabilities: the partition path gives exactly what a stable sort of the
whole row gives (ties in index order, at the k-th value too), and the probabilities are
the softmax's own values."""

from __future__ import annotations

import numpy as np
import pytest

from service.dataplane.scores import probabilities, top_indices


def stable_top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def rows(kind: str, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "ties":  # a handful of values: ties everywhere, across the k-th one too
        return rng.integers(0, 4, shape).astype(np.float32)
    if kind == "signed_zeros":
        x = rng.integers(-1, 2, shape).astype(np.float32)
        x[x == 0] = -0.0
        x[:, ::2][x[:, ::2] == 0] = 0.0
        return x
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, rng.integers(0, shape[1])] = np.inf if kind == "inf" else np.nan
    x[-1, rng.integers(0, shape[1])] = -np.inf
    return x


@pytest.mark.parametrize("kind", ["normal", "ties", "signed_zeros", "inf", "nan"])
def test_top_indices_are_the_stable_sorts(kind):
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 1200))
        k = int(rng.integers(1, min(n, 12) + 1))
        x = rows(kind, rng, (int(rng.integers(1, 4)), n))
        np.testing.assert_array_equal(top_indices(x, k), stable_top(x, k))


def test_probabilities_are_the_softmax_at_those_classes():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 1000)).astype(np.float32) * 8
    idx = top_indices(x, 5)
    z = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    softmax = z / z.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(probabilities(x, idx), np.take_along_axis(softmax, idx, axis=1))
