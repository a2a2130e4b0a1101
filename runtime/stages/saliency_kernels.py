"""kNN distance kernels behind the saliency prompt P^S (no torch).

Features arrive as [C, P] float32 (C channels, P grid positions), each column
L2-normalised, so cosine similarity is a matrix product and the reference's
distance is d = 0.5 * (1 - cos) in float32.

Two forms, each with a plain-numpy twin that is the definition of correct:

- `knn_distance_mean`: per position, the mean of its n largest distances
  ("farthest": the reference code, which fully sorts each row descending) or
  its n smallest ("nearest": the paper's nearest-neighbour equation). For long
  rows (the 64x64 grid: 4096 positions) the symmetric similarity is computed
  once per pair (upper triangle, onnxruntime's GEMM), and one numba pass keeps,
  per row, only the values under a threshold guessed from a sample, then
  selects among those (`_knn_symmetric`). Short rows take the row-block path:
  BLAS blocks, each reduced at once by a numba partial selection.
  `knn_distance_mean_graph` is the same as one ONNX graph (similarity + TopK)
  for onnxruntime's CUDA provider.
- `multi_instance_distance`: per object mask, each position inside it gets
  0.5 * (1 - max cosine to the positions of the other objects), the map is the
  max over objects. Computed tile by tile, never the whole |mask| x |others|
  matrix the reference materialises.
"""
from __future__ import annotations

import math
import threading
from typing import Any

import cv2
import numba
import numpy as np
import onnxruntime as ort

from ..engine.clock import engine_time
from ..engine.runners import DeviceRunner
from ..engine.sessions import builtin_graph, builtin_graph_session, session_options
from ..settings import EngineSettings

MODES = ("farthest", "nearest")
DEFAULT_BLOCK_BYTES = 16 << 20  # similarity block kept in memory at once
MAX_CELLS = 64  # beyond this many distinct mask overlaps, pairs of cells cost more than they save
_SAMPLE = 128  # values sampled per row to guess a selection threshold
_SAMPLE_STEP = 2654435761  # Knuth's multiplicative hash step: sample positions spread over the whole grid
_MIN_ROW_FOR_SAMPLING = 1024  # shorter rows go straight to quickselect
SYMMETRIC_PANEL_ROWS = 256  # rows of the similarity per BLAS call on the symmetric path
TRIANGLE_MAX_BYTES = 96 << 20  # the symmetric path keeps the upper triangle: 34 MB for a 64x64 grid
_GROUP = 16  # rows selected together: an earlier panel's columns are read 64 bytes at a time


def default_exclude_self(mode: str) -> bool:
    """The reference's "farthest" rows include the position itself (d ~ 0, never among the
    largest unless n ~ P); the paper's nearest neighbours must skip it, or every mean holds a 0."""
    return mode == "nearest"


def _check_features(features: np.ndarray) -> np.ndarray:
    if not isinstance(features, np.ndarray) or features.ndim != 2:
        raise ValueError(f"features must be a [C, P] array, got {getattr(features, 'shape', type(features))}")
    if features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"features [C, P] = {features.shape} is empty")
    features = np.ascontiguousarray(features, dtype=np.float32)
    if not np.isfinite(features).all():
        raise ValueError("features hold NaN or inf: the saliency CNN output is broken")
    return features


def _check_mode(mode: str, n: int) -> None:
    if mode not in MODES:
        raise ValueError(f"saliency mode must be one of {MODES}, got {mode!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (neighbours averaged) must be an integer >= 1, got {n!r}")


def rows_of(features: np.ndarray) -> np.ndarray:
    """[C, P] float32 -> its [P, C] transpose, C-contiguous: OpenCV's blocked transpose (0.16 ms
    for 176 x 4096 on 2 CPU cores; numpy's strided copy took 2.1 ms of a 55 ms lite call)."""
    return cv2.transpose(features)


def _effective_n(n: int, positions: int, exclude_self: bool) -> int:
    """As the reference's `sorted[:, :n]`: n larger than a row averages the whole row."""
    return min(int(n), positions - 1 if exclude_self else positions)


def _knn_arguments(features: np.ndarray, n: int, mode: str, exclude_self: bool | None) -> tuple[np.ndarray, bool, int, int]:
    """Checked features, the resolved self-exclusion, the position count and the neighbours averaged."""
    features = _check_features(features)
    _check_mode(mode, n)
    if exclude_self is None:
        exclude_self = default_exclude_self(mode)
    positions = features.shape[1]
    return features, exclude_self, positions, _effective_n(n, positions, exclude_self)


# ---------------------------------------------------------------- numba kernels


@numba.njit(cache=True)
def _select_smallest(buf, count, k):
    """Reorder buf[:count] so that buf[:k] holds its k smallest values.

    Quickselect with branch-free Lomuto partitions (random data defeats branch
    prediction, which dominated a Hoare version 3x over); a second pass splits
    off the values equal to the pivot so constant rows stay linear.
    """
    lo = 0
    hi = count
    target = k - 1
    while hi - lo > 16:
        mid = (lo + hi - 1) >> 1
        a = buf[lo]
        b = buf[mid]
        c = buf[hi - 1]
        if a > b:
            a, b = b, a
        if b > c:
            b = c
            if a > b:
                b = a
        pivot = b  # median of three
        store = lo
        for i in range(lo, hi):  # [lo, store) < pivot
            x = buf[i]
            buf[i] = buf[store]
            buf[store] = x
            store += np.int64(x < pivot)
        if target < store:
            hi = store
            continue
        equal_end = store
        for i in range(store, hi):  # [store, equal_end) == pivot
            x = buf[i]
            buf[i] = buf[equal_end]
            buf[equal_end] = x
            equal_end += np.int64(x <= pivot)
        if target < equal_end:
            return
        lo = equal_end
    for i in range(lo + 1, hi):  # insertion sort of the last few
        x = buf[i]
        j = i - 1
        while j >= lo and buf[j] > x:
            buf[j + 1] = buf[j]
            j -= 1
        buf[j + 1] = x


@numba.njit(cache=True)
def _select_smallest_near(buf, count, k, pivot):
    """_select_smallest with a first partition around `pivot`, a guess of the k-th value:
    one pass leaves a side of ~k values (or fewer) for the quickselect instead of all."""
    store = 0
    for i in range(count):  # branch-free Lomuto: [0, store) < pivot
        x = buf[i]
        buf[i] = buf[store]
        buf[store] = x
        store += np.int64(x < pivot)
    if store >= k:
        _select_smallest(buf, store, k)
    elif store < count:
        _select_smallest(buf[store:count], count - store, k - store)


@numba.njit(cache=True)
def _samples_help(k, length):
    """Rows this long, with k at most half of them, are worth a sampled threshold."""
    return length >= _MIN_ROW_FOR_SAMPLING and k * 2 <= length


@numba.njit(cache=True)
def _sample_rank(k, length):
    """Rank in the sample whose value keeps ~k + 3 sigma of a row: too few only ~0.1% of the time."""
    q = k / length
    return int(q * _SAMPLE + 3.0 * math.sqrt(_SAMPLE * q * (1.0 - q)) + 2.0)


@numba.njit(cache=True)
def _sample_threshold(sample, rank):
    """The (rank+1)-th smallest value of sample[:_SAMPLE] (reorders sample)."""
    _select_smallest(sample, _SAMPLE, rank + 1)
    threshold = sample[0]
    for t in range(1, rank + 1):
        if sample[t] > threshold:
            threshold = sample[t]
    return threshold


@numba.njit(cache=True)
def _sum_of_k_distances(keys, k, sign):
    """Sum (float64) of the distances 0.5 * (1 - s) of keys[:k] = sign * s."""
    total = 0.0
    for t in range(k):
        s = sign * keys[t]  # exact: sign is +-1
        total += np.float32(0.5) * (np.float32(1.0) - s)  # float32 as the reference computes it
    return total


@numba.njit(cache=True)
def _row_sum_of_k_smallest_distances(row, k, sign, skip, buf, sample):
    """Sum (float64) of the k distances 0.5 * (1 - s) whose keys sign * s are smallest.

    sign = +1 picks the smallest similarities (largest distances, "farthest"),
    sign = -1 the largest similarities ("nearest"). Index `skip` (>= 0) is left out.
    A threshold guessed from a scattered sample keeps only ~k + margin candidates
    for the quickselect; when the guess keeps fewer than k, the whole row is used.
    """
    length = row.shape[0]
    count = 0
    if _samples_help(k, length):
        for t in range(_SAMPLE):
            # scattered, not strided: a stride picks a few image columns of the grid and misleads
            sample[t] = sign * row[(t * _SAMPLE_STEP) % length]
        rank = _sample_rank(k, length)
        if rank < _SAMPLE:
            threshold = _sample_threshold(sample, rank)
            # branch-free compaction of every key <= threshold
            for t in range(length):
                key = sign * row[t]
                buf[count] = key
                count += np.int64(key <= threshold) * np.int64(t != skip)
            if count < k:
                count = 0  # guess too tight: fall back to the full row
    if count == 0:
        for t in range(length):
            if t != skip:
                buf[count] = sign * row[t]
                count += 1
    _select_smallest(buf, count, k)
    return _sum_of_k_distances(buf, k, sign)


@numba.njit(cache=True, parallel=True)
def _block_mean_distance(sim, first_row, k, sign, exclude_self, chunks, out):
    """out[r] = mean of the selected k distances of sim[r] (row r is position first_row + r)."""
    rows, length = sim.shape
    chunks = max(1, min(rows, chunks))
    per_chunk = (rows + chunks - 1) // chunks
    for c in numba.prange(chunks):
        buf = np.empty(length, np.float32)
        sample = np.empty(_SAMPLE, np.float32)
        for r in range(c * per_chunk, min(rows, (c + 1) * per_chunk)):
            skip = first_row + r if exclude_self else -1
            out[r] = np.float32(_row_sum_of_k_smallest_distances(sim[r], k, sign, skip, buf, sample) / k)


@numba.njit(cache=True, parallel=True)
def _rows_mean_distance(sim, rows, k, sign, exclude_self, out):
    """out[rows[i]] = mean of the selected k distances of sim[i] (sim[i] is position rows[i]'s full row)."""
    count, length = sim.shape
    for i in numba.prange(count):
        buf = np.empty(length, np.float32)
        sample = np.empty(_SAMPLE, np.float32)
        skip = rows[i] if exclude_self else -1
        out[rows[i]] = np.float32(_row_sum_of_k_smallest_distances(sim[i], k, sign, skip, buf, sample) / k)


@numba.njit(cache=True)
def _append_candidates(values, limit, sign, row, filled):
    """Append the keys sign * values[c] <= limit to row[filled:]; return the new count.

    Branch-free (the key is written, the count advances or not); past the row's capacity
    nothing is written but counting goes on, so the caller sees the overflow.
    """
    capacity = row.shape[0]
    for c in range(values.shape[0]):
        key = sign * values[c]
        if filled < capacity:  # false only on overflow: predicted
            row[filled] = key
        filled += key <= limit
    return filled


@numba.njit(cache=True, parallel=True)
def _triangle_mean_distance(tri, offsets, panel_rows, sampled, k, sign, exclude_self, capacity, out, redo):
    """out[p] for every position from the upper triangle of the similarity matrix.

    tri holds panel i = S[i*R:(i+1)*R, i*R:] row-major at offsets[i] (R = panel_rows), so
    S[p, c] for c >= the start of p's panel lies in p's own panel row, and for c before it,
    transposed, in an earlier panel: each product was computed once and serves both rows.
    Row p keeps the keys sign * s at most a threshold guessed from sampled[p] (its
    similarities to _SAMPLE scattered positions) and reduces them with a quickselect. Rows
    whose guess kept fewer than k or more than `capacity` are flagged in redo instead.
    Rows are handled _GROUP at a time so an earlier panel's columns are read as short
    contiguous runs (a column walk would touch one page per value).
    """
    positions = sampled.shape[0]
    rank = _sample_rank(k, positions)
    middle = min(rank, int(k / positions * _SAMPLE))
    groups = (positions + _GROUP - 1) // _GROUP
    for g in numba.prange(groups):
        g0 = g * _GROUP
        n = min(positions, g0 + _GROUP) - g0
        panel = g0 // panel_rows  # panel_rows is a multiple of _GROUP: a group sits in one panel
        first = panel * panel_rows
        cand = np.empty((_GROUP, capacity), np.float32)
        filled = np.zeros(_GROUP, np.int64)
        limit = np.empty(_GROUP, np.float32)
        guess = np.empty(_GROUP, np.float32)  # the sample's estimate of each row's k-th key
        sample = np.empty(_SAMPLE, np.float32)
        flipped = np.empty((_GROUP, panel_rows), np.float32)
        for q in range(n):
            for t in range(_SAMPLE):
                sample[t] = sign * sampled[g0 + q, t]
            limit[q] = _sample_threshold(sample, rank)  # leaves sample[:rank + 1] the smallest
            _select_smallest(sample, rank + 1, middle + 1)
            guess[q] = sample[0]
            for t in range(1, middle + 1):
                guess[q] = max(guess[q], sample[t])
        for j in range(panel):  # columns before this panel: transposed from earlier (full) panels
            width = positions - j * panel_rows
            base = offsets[j] + g0 - j * panel_rows
            if n == _GROUP:  # a constant trip count lets LLVM unroll the transpose
                for r in range(panel_rows):
                    start = base + r * width
                    for q in range(_GROUP):
                        flipped[q, r] = tri[start + q]
            else:
                for r in range(panel_rows):
                    start = base + r * width
                    for q in range(n):
                        flipped[q, r] = tri[start + q]
            for q in range(n):
                filled[q] = _append_candidates(flipped[q], limit[q], sign, cand[q], filled[q])
        width = positions - first
        for q in range(n):
            r = g0 + q - first  # the row in its panel; its own column there is r too
            start = offsets[panel] + r * width
            if exclude_self:  # two runs around the diagonal: a per-value test would double the cost
                filled[q] = _append_candidates(tri[start:start + r], limit[q], sign, cand[q], filled[q])
                filled[q] = _append_candidates(tri[start + r + 1:start + width], limit[q], sign, cand[q], filled[q])
            else:
                filled[q] = _append_candidates(tri[start:start + width], limit[q], sign, cand[q], filled[q])
            if filled[q] < k or filled[q] > capacity:
                redo[g0 + q] = True  # the sample misled (too few) or kept too many to hold
            else:
                _select_smallest_near(cand[q], filled[q], k, guess[q])
                out[g0 + q] = np.float32(_sum_of_k_distances(cand[q], k, sign) / k)


# ---------------------------------------------------------------- single object


def knn_distance_mean(
    features: np.ndarray,
    n: int,
    mode: str = "farthest",
    exclude_self: bool | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    gemm_backend: str = "onnxruntime",
) -> np.ndarray:
    """Per position, the mean of its n largest ("farthest") or n smallest ("nearest") distances.

    features: [C, P] float32, columns L2-normalised. Returns [P] float32.
    exclude_self: leave the position's own distance out (default: False for "farthest",
    as the reference; True for "nearest"). n larger than the candidates averages all of
    them, as the reference's slice does; with no candidate at all (P = 1 and the position
    excluded) the mean is 0.
    block_bytes: memory for one block of similarities on the row-block path. Long rows
    (P >= 1024, n <= P / 2) take the symmetric path, which keeps the upper triangle instead
    (~2 P^2 bytes: 34 MB for a 64x64 grid, reused per thread) when it fits TRIANGLE_MAX_BYTES.
    gemm_backend: EngineSettings.gemm_backend, who computes the similarity products.
    """
    features, exclude_self, positions, k = _knn_arguments(features, n, mode, exclude_self)
    if gemm_backend not in GEMM_BACKENDS:
        raise ValueError(f"gemm_backend must be one of {', '.join(GEMM_BACKENDS)}, got {gemm_backend!r}")
    out = np.zeros(positions, np.float32)
    if k < 1:
        return out
    sign = np.float32(1.0 if mode == "farthest" else -1.0)
    if _samples_help(k, positions) and 4 * _triangle_layout(positions, SYMMETRIC_PANEL_ROWS)[1] <= TRIANGLE_MAX_BYTES:
        return _knn_symmetric(features, k, sign, bool(exclude_self), out, backend=gemm_backend)
    block_rows = int(max(1, min(positions, block_bytes // (4 * positions))))
    block = np.empty((block_rows, positions), np.float32)
    transposed = rows_of(features)
    chunks = 4 * numba.get_num_threads()  # a few chunks per thread: rows differ in cost
    for first in range(0, positions, block_rows):
        rows = min(block_rows, positions - first)
        sim = block[:rows]
        gemm_transposed(transposed[first:first + rows], transposed, sim, gemm_backend)  # float32, as the reference
        _block_mean_distance(sim, first, k, sign, bool(exclude_self), chunks, out[first:first + rows])
    return out


GEMM_BACKENDS = ("onnxruntime", "numpy")  # "numpy": OpenBLAS, for comparisons
_gemm_sessions: dict[int, Any] = {}
_gemm_lock = threading.Lock()


def _gemm_session(threads: int) -> Any:
    """onnxruntime session for the Gemm graph, one per thread count, shared by all callers.

    Its worker threads block rather than spin once a product is done: the numba pass that
    follows needs the cores (spinning BLAS workers cost it ~2x on two cores). The options are
    the runtime's CPU session options, so the workers are pinned when they take every CPU
    (sessions.worker_affinities: unpinned, the 16 panel products of a 64x64 grid took
    40-44 ms instead of 18-19 ms after the reference had run).
    """
    with _gemm_lock:
        session = _gemm_sessions.get(threads)
        if session is None:
            options = session_options(threads, spinning=False)
            session = _gemm_sessions[threads] = ort.InferenceSession(
                builtin_graph("gemm_transposed"), options, providers=["CPUExecutionProvider"])
        return session


def gemm_transposed(a: np.ndarray, b: np.ndarray, out: np.ndarray, backend: str = "onnxruntime") -> np.ndarray:
    """out[...] = a @ b.T in float32; a [m, k] and b [n, k] C-contiguous, out [m, n] C-contiguous."""
    if backend == "numpy":
        return np.matmul(a, b.T, out=out)
    session = _gemm_session(numba.get_num_threads())
    binding = session.io_binding()
    binding.bind_input("a", "cpu", 0, np.float32, a.shape, a.ctypes.data)
    binding.bind_input("b", "cpu", 0, np.float32, b.shape, b.ctypes.data)
    binding.bind_output("y", "cpu", 0, np.float32, out.shape, out.ctypes.data)
    with engine_time():
        session.run_with_iobinding(binding)
    return out


_local = threading.local()


def _scratch(size: int) -> np.ndarray:
    """A float32 buffer of `size` kept per thread between calls: a fresh 34 MB triangle per image
    costs ~5 ms of page faults. Each thread has its own, so concurrent pipelines stay safe."""
    buffer = getattr(_local, "triangle", None)
    if buffer is None or buffer.size < size:
        buffer = _local.triangle = np.empty(size, np.float32)
    return buffer[:size]


def _triangle_layout(positions: int, panel_rows: int) -> tuple[np.ndarray, int]:
    """Start of each panel in the flat triangle buffer, and the buffer's length."""
    firsts = np.arange(0, positions, panel_rows, dtype=np.int64)
    sizes = np.minimum(panel_rows, positions - firsts) * (positions - firsts)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64), int(sizes.sum())


def _knn_symmetric(
    features: np.ndarray, k: int, sign: np.float32, exclude_self: bool, out: np.ndarray,
    panel_rows: int = SYMMETRIC_PANEL_ROWS, capacity: int | None = None, backend: str = "onnxruntime",
) -> np.ndarray:
    """knn_distance_mean for long rows: each similarity computed once, one parallel pass.

    BLAS computes the upper triangle in panels of rows (~half the products of the full
    matrix, and no numba work in between, so the BLAS and numba thread pools do not fight),
    then one numba pass selects per row (see _triangle_mean_distance). Rows whose sampled
    threshold failed are recomputed alone. Extra memory: the triangle, ~2 * P^2 bytes.
    """
    positions = features.shape[1]
    if panel_rows % _GROUP:
        raise ValueError(f"panel_rows must be a multiple of {_GROUP}, got {panel_rows}")
    transposed = rows_of(features)
    picks = (np.arange(_SAMPLE, dtype=np.int64) * _SAMPLE_STEP) % positions  # as the per-row sample
    sampled = np.empty((positions, _SAMPLE), np.float32)
    gemm_transposed(transposed, np.ascontiguousarray(transposed[picks]), sampled, backend)
    offsets, total = _triangle_layout(positions, panel_rows)
    tri = _scratch(total)
    for index, first in enumerate(range(0, positions, panel_rows)):
        last = min(positions, first + panel_rows)
        panel = tri[offsets[index]:offsets[index] + (last - first) * (positions - first)]
        gemm_transposed(transposed[first:last], transposed[first:], panel.reshape(last - first, positions - first), backend)
    if capacity is None:
        expected = (_sample_rank(k, positions) + 1) / _SAMPLE * positions
        capacity = int(min(positions, 2 * expected + k))
    redo = np.zeros(positions, np.bool_)
    _triangle_mean_distance(tri, offsets, panel_rows, sampled, k, sign, exclude_self, max(1, capacity), out, redo)
    rows = np.flatnonzero(redo)
    if len(rows):
        _rows_mean_distance(transposed[rows] @ features, rows, k, sign, exclude_self, out)
    return out


# ---------------------------------------------------------------- the same on a GPU

# knn_distance_mean as one ONNX graph for onnxruntime's CUDA provider (numba stays the CPU path):
# runtime/data/graphs/knn_distance_mean.onnx, built by export/builtin_graphs.py (see there).


def knn_session(device: str = "cuda", settings: EngineSettings | None = None) -> Any:
    """An onnxruntime session of the kNN graph on `device` ("cpu" for tests; "cuda" on a GPU pipeline)."""
    return builtin_graph_session("knn_distance_mean", device, settings)


def knn_distance_mean_graph(
    features: Any, n: int, mode: str = "farthest", exclude_self: bool | None = None, session: Any = None
) -> np.ndarray:
    """knn_distance_mean through the ONNX graph (similarity and top-n on the session's device).

    features: a [C, P] array, or the saliency CNN's [1, C, H, W] output as an OrtValue left on
    the session's device (P = H * W; nothing crosses to the host but the P means). The whole
    P x P similarity lives on the device at once (64 MB for a 64x64 grid); means are summed in
    float32 there, so results agree with the numba path to ~1e-6, not bit for bit.
    """
    if isinstance(features, np.ndarray):
        features, exclude_self, positions, k = _knn_arguments(features, n, mode, exclude_self)
        features = features.reshape(1, features.shape[0], positions, 1)
    else:  # an OrtValue on the device: the graph's feature_sum stands in for the host's finiteness check
        shape = tuple(features.shape())
        if len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
            raise ValueError(f"device features must be [1, C, H, W], got {shape}")
        _check_mode(mode, n)
        exclude_self = default_exclude_self(mode) if exclude_self is None else exclude_self
        positions = shape[2] * shape[3]
        k = _effective_n(n, positions, exclude_self)
    if k < 1:
        return np.zeros(positions, np.float32)
    feeds = {
        "features": features,
        "k": np.array([k], np.int64),
        "sign": np.array([1.0 if mode == "farthest" else -1.0], np.float32),
        "self_penalty": np.array([4.0 if exclude_self else 0.0], np.float32),
    }
    # A runner (one IO binding) per call: extractors sharing the session may run in several threads.
    out, total = DeviceRunner(session or knn_session()).run(["mean_distance", "feature_sum"], feeds)
    if not np.isfinite(total):
        raise ValueError("features hold NaN or inf: the saliency CNN output is broken")
    return out


def knn_distance_mean_twin(
    features: np.ndarray, n: int, mode: str = "farthest", exclude_self: bool | None = None
) -> np.ndarray:
    """Plain-numpy definition of `knn_distance_mean`: whole matrix, full sort (small P only)."""
    features, exclude_self, positions, k = _knn_arguments(features, n, mode, exclude_self)
    if k < 1:
        return np.zeros(positions, np.float32)
    distance = np.float32(0.5) * (np.float32(1.0) - features.T @ features)
    if exclude_self:
        distance = distance[~np.eye(positions, dtype=bool)].reshape(positions, positions - 1)
    ordered = np.sort(distance, axis=1)
    chosen = ordered[:, ::-1][:, :k] if mode == "farthest" else ordered[:, :k]
    return chosen.astype(np.float64).mean(axis=1).astype(np.float32)


# ---------------------------------------------------------------- several objects


def _check_masks(masks: np.ndarray, positions: int) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim < 2:
        raise ValueError(f"object masks must be [M, P] or [M, h, w], got shape {masks.shape}")
    masks = masks.reshape(masks.shape[0], int(np.prod(masks.shape[1:])))
    if masks.shape[1] != positions:
        raise ValueError(f"object masks cover {masks.shape[1]} positions, the feature grid has {positions}")
    return masks > 0


def multi_instance_distance(
    features: np.ndarray, masks: np.ndarray, block_bytes: int = DEFAULT_BLOCK_BYTES, max_cells: int = MAX_CELLS
) -> np.ndarray:
    """The reference's multi-instance saliency on the feature grid.

    features: [C, P] float32, columns L2-normalised; masks: [M, P] or [M, h, w], > 0 inside.
    For each object i and position p inside it: 0.5 * (1 - max cosine between p and the
    positions of the other objects), where positions that also lie inside object i count
    as zero vectors (cosine 0), as the reference zeroes them before gathering. The result
    [P] float32 is the max over objects, 0 outside every object.
    Where the reference crashes, this returns: masks empty on the grid are dropped; with
    fewer than two non-empty masks there is nothing to compare and the map is all 0.

    Positions are grouped into cells with the same set of objects; each pair of cells is
    multiplied once, tile by tile, and serves both sides (row max and column max), half
    the products of the reference's per-object loop. With more than `max_cells` cells
    (many jagged overlaps) the per-object loop is used instead.
    """
    features = _check_features(features)
    masks = _check_masks(masks, features.shape[1])
    masks = masks[masks.any(axis=1)]
    out = np.zeros(features.shape[1], np.float32)
    if len(masks) < 2:
        return out
    union = np.flatnonzero(masks.any(axis=0))
    signatures, cell_of = np.unique(masks[:, union].T, axis=0, return_inverse=True)  # [cells, M]
    cell_of = cell_of.reshape(-1)
    # an object overlapped by another sees zero vectors there: its max similarity is at least 0
    overlapped = signatures[signatures.sum(axis=1) >= 2].any(axis=0)
    floor = np.where(overlapped, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)
    tile = _tile_side(block_bytes)
    if len(signatures) > max_cells:
        out[union] = _per_object_scores(features, masks, floor, tile)[union]
    else:
        cells = [union[cell_of == c] for c in range(len(signatures))]
        # best[c][:, t]: running max similarity of the cell's positions for its t-th object
        best = [np.tile(floor[sig], (len(pos), 1)) for sig, pos in zip(signatures, cells)]
        for a in range(len(cells)):
            for b in range(a + 1, len(cells)):
                rows_for = signatures[a] & ~signatures[b]  # objects of a that compare with b's positions
                cols_for = signatures[b] & ~signatures[a]
                rows_slot = rows_for[signatures[a]]  # as columns of best[a]
                cols_slot = cols_for[signatures[b]]
                for r0 in range(0, len(cells[a]), tile):
                    left = np.ascontiguousarray(features[:, cells[a][r0:r0 + tile]].T)
                    for c0 in range(0, len(cells[b]), tile):
                        sim = left @ features[:, cells[b][c0:c0 + tile]]
                        if rows_slot.any():
                            part = best[a][r0:r0 + tile]
                            part[:, rows_slot] = np.maximum(part[:, rows_slot], sim.max(axis=1)[:, None])
                        if cols_slot.any():
                            part = best[b][c0:c0 + tile]
                            part[:, cols_slot] = np.maximum(part[:, cols_slot], sim.max(axis=0)[:, None])
        for sig, pos, cell_best in zip(signatures, cells, best):
            # max over the cell's objects of 0.5 * (1 - best) = 0.5 * (1 - min best)
            out[pos] = np.float32(0.5) * (np.float32(1.0) - cell_best.min(axis=1))
    inside_all = masks.all(axis=0)
    # the reference's max over objects also sees 0 from every object a position is not in
    np.maximum(out, 0.0, out=out, where=~inside_all)
    return out


def _tile_side(block_bytes: int) -> int:
    return max(64, int(math.isqrt(max(1, block_bytes // 4))))  # square tiles of similarities


def _per_object_scores(features: np.ndarray, masks: np.ndarray, floor: np.ndarray, tile: int) -> np.ndarray:
    """The reference's loop: each object's positions against all other objects' positions.
    Returns [P] scores maxed over the objects holding each position (-inf outside all)."""
    union = masks.any(axis=0)
    scores = np.full(features.shape[1], -np.inf, np.float32)
    for i, inside in enumerate(masks):
        rows = np.flatnonzero(inside)
        cols = np.flatnonzero(union & ~inside)
        for r0 in range(0, len(rows), tile):
            row_idx = rows[r0:r0 + tile]
            left = np.ascontiguousarray(features[:, row_idx].T)
            best = np.full(len(row_idx), floor[i], np.float32)
            for c0 in range(0, len(cols), tile):
                np.maximum(best, (left @ features[:, cols[c0:c0 + tile]]).max(axis=1), out=best)
            score = np.float32(0.5) * (np.float32(1.0) - best)
            scores[row_idx] = np.maximum(scores[row_idx], score)
    return scores


def multi_instance_distance_twin(features: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Plain-numpy definition of `multi_instance_distance`, written as the reference does it
    (zero the object's own positions, gather the others' features, one dense product)."""
    features = _check_features(features)
    masks = _check_masks(masks, features.shape[1])
    masks = [m for m in masks if m.any()]
    out = np.zeros(features.shape[1], np.float32)
    if len(masks) < 2:
        return out
    maps = []
    for i, inside in enumerate(masks):
        zeroed = features.copy()
        zeroed[:, inside] = 0.0
        others = np.concatenate([zeroed[:, m] for j, m in enumerate(masks) if j != i], axis=1)
        similarity = features[:, inside].T @ others
        one = np.zeros(features.shape[1], np.float32)
        one[inside] = np.float32(0.5) * (np.float32(1.0) - similarity.max(axis=1))
        maps.append(one)
    return np.max(np.stack(maps), axis=0)
