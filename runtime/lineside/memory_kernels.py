"""Kernels behind the normal memory (no torch): nearest-neighbour search and greedy coreset.

Features are rows [N, C] float32, L2-normalised, so cosine similarity is a matrix
product and the distance is the saliency's d = 0.5 * (1 - cos).

- `nearest_distance`: per query row, the mean of its k smallest distances to the
  bank. Query rows go in blocks through one BLAS product with the whole bank
  (memory: one block), then a max (k = 1) or a partial selection (np.partition).
  Cost O(P * M * C) for P queries and a bank of M: the bank's bound is the time bound.
- `greedy_coreset`: greedy k-center selection (Gonzalez; the coreset of PatchCore):
  start from row 0, repeatedly take the row farthest from everything taken so far.
  Whatever is left is within the returned radius of a taken row. The distance update
  is a numba loop over the rows (float32, memory bound: about 1.2 ms a step for
  65536 rows of 64 values here), after a fixed random projection that makes it cheaper.

Each has a plain-numpy twin that the tests use as the definition of correct.
"""
from __future__ import annotations

import numba
import numpy as np

DEFAULT_BLOCK_BYTES = 16 << 20  # similarities of one query block held at once


def check_rows(values: np.ndarray, what: str, channels: int | None = None) -> np.ndarray:
    """[N, C] finite float32, C == channels when given; a ValueError naming `what` otherwise."""
    if not isinstance(values, np.ndarray) or values.ndim != 2:
        raise ValueError(f"{what} must be an [N, C] array, got {getattr(values, 'shape', type(values).__name__)}")
    if channels is not None and values.shape[1] != channels:
        raise ValueError(f"{what} have {values.shape[1]} channels, expected {channels}")
    values = np.ascontiguousarray(values, dtype=np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"{what} hold NaN or infinity")
    return values


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (nearest neighbours averaged) must be an integer >= 1, got {k!r}")
    return int(k)


# ---------------------------------------------------------------- search


def nearest_distance(queries: np.ndarray, bank: np.ndarray, k: int = 1,
                     block_bytes: int = DEFAULT_BLOCK_BYTES) -> np.ndarray:
    """[P] float32: per query row, the mean of its k smallest d = 0.5 * (1 - cos) to the bank rows.

    k larger than the bank averages the whole bank. An empty bank is an error (nothing to compare).
    """
    queries = check_rows(queries, "query features")
    bank = check_rows(bank, "memory features", queries.shape[1])
    if len(bank) == 0:
        raise ValueError("the memory is empty: nothing to compare with")
    k = min(_check_k(k), len(bank))
    out = np.empty(len(queries), np.float32)
    rows = int(max(1, min(len(queries), block_bytes // (4 * len(bank)))))
    block = np.empty((rows, len(bank)), np.float32)
    bank_t = bank.T
    for first in range(0, len(queries), rows):
        count = min(rows, len(queries) - first)
        sim = block[:count]
        np.matmul(queries[first:first + count], bank_t, out=sim)  # BLAS
        if k == 1:
            best = sim.max(axis=1)  # d is monotone in -cos: the nearest is the most similar
            out[first:first + count] = np.float32(0.5) * (np.float32(1.0) - best)
        else:
            top = -np.partition(-sim, k - 1, axis=1)[:, :k]  # the k largest similarities, unordered
            distance = np.float32(0.5) * (np.float32(1.0) - top)
            out[first:first + count] = distance.astype(np.float64).mean(axis=1).astype(np.float32)
    return out


def nearest_distance_twin(queries: np.ndarray, bank: np.ndarray, k: int = 1) -> np.ndarray:
    """Plain-numpy definition of `nearest_distance`: the whole distance matrix, fully sorted."""
    queries = check_rows(queries, "query features")
    bank = check_rows(bank, "memory features", queries.shape[1])
    if len(bank) == 0:
        raise ValueError("the memory is empty: nothing to compare with")
    k = min(_check_k(k), len(bank))
    distance = np.float32(0.5) * (np.float32(1.0) - queries @ bank.T)
    return np.sort(distance, axis=1)[:, :k].astype(np.float64).mean(axis=1).astype(np.float32)


# ---------------------------------------------------------------- coreset


@numba.njit(cache=True, fastmath=True)
def _update(points, center, min_dist):
    """min_dist = min(min_dist, |points - center|^2); returns the farthest row (first of equals)."""
    rows, dims = points.shape
    for r in range(rows):
        total = np.float32(0.0)
        for j in range(dims):
            diff = points[r, j] - center[j]
            total += diff * diff
        if total < min_dist[r]:
            min_dist[r] = total
    value = np.float32(-1.0)
    index = 0
    for r in range(rows):
        if min_dist[r] > value:  # strict: the first of equal rows wins, as np.argmax
            value = min_dist[r]
            index = r
    return value, index


@numba.njit(cache=True)
def _greedy(points, size):
    # Serial on purpose: a parallel region per step stalled on 2 shared cores (16 ms vs 1.2 ms a step).
    chosen = np.empty(size, np.int64)
    min_dist = np.full(points.shape[0], np.inf, np.float32)
    center = np.empty(points.shape[1], np.float32)
    current = 0
    radius = np.float32(0.0)
    for i in range(size):
        chosen[i] = current
        center[:] = points[current]
        radius, current = _update(points, center, min_dist)
    return chosen, radius


def project(points: np.ndarray, dims: int | None, seed: int = 0) -> np.ndarray:
    """Rows projected to `dims` by a fixed Gaussian matrix (None or dims >= C: unchanged).

    Distances are kept up to a small factor (Johnson-Lindenstrauss), enough to pick centres.
    """
    points = check_rows(points, "coreset features")
    if dims is None or dims >= points.shape[1]:
        return points
    if dims < 1:
        raise ValueError(f"projection dims must be >= 1, got {dims}")
    matrix = np.random.default_rng(seed).standard_normal((points.shape[1], dims)).astype(np.float32)
    return np.ascontiguousarray(points @ (matrix / np.float32(np.sqrt(dims))))


def greedy_coreset(points: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Indices (in the order taken) of `size` rows chosen by greedy k-center, and the radius:
    the largest squared Euclidean distance from a row to its nearest chosen row.

    size >= rows takes every row (radius 0). Rows are used as given: project first to save time.
    """
    points = check_rows(points, "coreset features")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"coreset size must be an integer >= 1, got {size!r}")
    if size >= len(points):
        return np.arange(len(points), dtype=np.int64), 0.0
    chosen, radius = _greedy(points, int(size))
    return chosen, float(radius)


def greedy_coreset_twin(points: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Plain-numpy definition of `greedy_coreset`: same start, same tie rule (first of equals),
    float32 distances (summed in another order: equal where the sums are exact)."""
    points = check_rows(points, "coreset features")
    if size >= len(points):
        return np.arange(len(points), dtype=np.int64), 0.0
    min_dist = np.full(len(points), np.inf, np.float32)
    chosen = []
    current, radius = 0, 0.0
    for _ in range(size):
        chosen.append(current)
        min_dist = np.minimum(min_dist, ((points - points[current]) ** 2).sum(axis=1))
        current = int(np.argmax(min_dist))
        radius = float(min_dist[current])
    return np.array(chosen, dtype=np.int64), radius


__all__ = ["DEFAULT_BLOCK_BYTES", "check_rows", "greedy_coreset", "greedy_coreset_twin", "nearest_distance",
           "nearest_distance_twin", "project"]
