"""The saliency kNN kernels against their plain-numpy twins (the definition of correct)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import saliency_kernels as K

ATOL = 1e-6  # float64 sums in a different order, cast to float32: at most an ulp or two apart


def unit_features(channels: int, positions: int, seed: int, relu: bool = True, levels: int = 0) -> np.ndarray:
    """[C, P] float32 with unit columns; levels > 0 quantises before normalising (equal columns -> ties)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((channels, positions)).astype(np.float32)
    if relu:
        x = np.maximum(x, 0.0) + np.float32(1e-3)
    if levels:
        x = np.round(x * levels) / levels + np.float32(1e-3)
    return (x / np.linalg.norm(x, axis=0, keepdims=True)).astype(np.float32)


def block_twin(sim: np.ndarray, first_row: int, k: int, farthest: bool, exclude_self: bool) -> np.ndarray:
    distance = np.float32(0.5) * (np.float32(1.0) - sim)
    out = []
    for r, row in enumerate(distance):
        if exclude_self:
            row = np.delete(row, first_row + r)
        ordered = np.sort(row)
        chosen = ordered[::-1][:k] if farthest else ordered[:k]
        out.append(chosen.astype(np.float64).mean())
    return np.asarray(out, np.float32)


# ---------------------------------------------------------------- selection on arbitrary blocks


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    length=st.sampled_from([1, 2, 3, 17, 100, 1024, 1500, 4096]),
    k_fraction=st.floats(0.0, 1.0),
    farthest=st.booleans(),
    exclude_self=st.booleans(),
    levels=st.sampled_from([0, 2, 8, 1000]),  # 0: continuous; small: heavy ties
    seed=st.integers(0, 2**16),
)
def test_block_selection_matches_sorting(rows, length, k_fraction, farthest, exclude_self, levels, seed):
    rng = np.random.default_rng(seed)
    sim = rng.uniform(-1, 1, (rows, length)).astype(np.float32)
    if levels:
        sim = (np.round(sim * levels) / levels).astype(np.float32)
    first_row = int(rng.integers(0, max(1, length - rows + 1)))
    if exclude_self and (length < 2 or first_row + rows > length):
        exclude_self = False
    candidates = length - 1 if exclude_self else length
    k = max(1, int(round(k_fraction * candidates)))
    out = np.zeros(rows, np.float32)
    sign = np.float32(1.0 if farthest else -1.0)
    K._block_mean_distance(sim, first_row, k, sign, exclude_self, 3, out)
    np.testing.assert_allclose(out, block_twin(sim, first_row, k, farthest, exclude_self), atol=ATOL, rtol=0)


def test_selection_falls_back_when_the_sample_misleads():
    """The sample sees only the smallest values: its threshold keeps < k candidates."""
    length, k = 4096, 400
    sampled = (np.arange(K._SAMPLE) * K._SAMPLE_STEP) % length
    row = np.linspace(0.0, 0.9, length, dtype=np.float32)[::-1].copy()
    row[sampled] = np.linspace(-1.0, -0.9, len(sampled), dtype=np.float32)  # sampled = smallest
    sim = row[None, :]
    out = np.zeros(1, np.float32)
    K._block_mean_distance(sim, 0, k, np.float32(1.0), False, 1, out)
    np.testing.assert_allclose(out, block_twin(sim, 0, k, True, False), atol=ATOL, rtol=0)


def test_select_smallest_constant_and_sorted_rows():
    for values in (np.full(5000, 0.25, np.float32), np.arange(5000, dtype=np.float32), np.arange(5000, dtype=np.float32)[::-1].copy()):
        for k in (1, 17, 2500, 5000):
            buf = values.copy()
            K._select_smallest(buf, len(buf), k)
            assert np.sort(buf[:k]).tolist() == np.sort(values)[:k].tolist()


# ---------------------------------------------------------------- knn_distance_mean


@settings(max_examples=25, deadline=None)
@given(
    channels=st.integers(1, 24),
    positions=st.integers(1, 300),
    n=st.integers(1, 400),
    mode=st.sampled_from(K.MODES),
    exclude_self=st.sampled_from([None, True, False]),
    levels=st.sampled_from([0, 1, 3]),
    seed=st.integers(0, 2**16),
)
def test_knn_distance_mean_matches_twin(channels, positions, n, mode, exclude_self, levels, seed):
    features = unit_features(channels, positions, seed, levels=levels)
    block_bytes = 1 << 12  # several row blocks even for small grids
    got = K.knn_distance_mean(features, n, mode, exclude_self, block_bytes=block_bytes)
    np.testing.assert_allclose(got, K.knn_distance_mean_twin(features, n, mode, exclude_self), atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", K.MODES)
def test_knn_on_a_real_sized_grid(mode):
    """64x64 grid, 176 channels, n = 400: the sampled-threshold path on every row."""
    features = unit_features(176, 4096, seed=3)
    got = K.knn_distance_mean(features, 400, mode)
    np.testing.assert_allclose(got, K.knn_distance_mean_twin(features, 400, mode), atol=ATOL, rtol=0)


def test_self_distance_is_excluded_or_not_as_asked():
    # Two far apart groups; n = 1 nearest: with self the mean is ~0, without it the twin's distance.
    features = unit_features(8, 10, seed=1)
    with_self = K.knn_distance_mean(features, 1, "nearest", exclude_self=False)
    without = K.knn_distance_mean(features, 1, "nearest", exclude_self=True)
    assert np.all(np.abs(with_self) < 1e-6)
    assert np.all(without > 1e-3)
    assert K.default_exclude_self("nearest") and not K.default_exclude_self("farthest")


def test_n_larger_than_the_row_averages_all_and_single_position_is_zero():
    features = unit_features(4, 5, seed=2)
    distance = 0.5 * (1.0 - features.T.astype(np.float64) @ features)
    np.testing.assert_allclose(K.knn_distance_mean(features, 1000), distance.mean(axis=1), atol=1e-6)
    one = unit_features(4, 1, seed=2)
    assert K.knn_distance_mean(one, 5, "nearest").tolist() == [0.0]  # nothing but itself, excluded


def test_knn_bad_input_fails_clearly():
    features = unit_features(4, 10, seed=0)
    with pytest.raises(ValueError, match="mode"):
        K.knn_distance_mean(features, 3, "closest")
    with pytest.raises(ValueError, match="n "):
        K.knn_distance_mean(features, 0)
    with pytest.raises(ValueError, match=r"\[C, P\]"):
        K.knn_distance_mean(features[0], 3)
    broken = features.copy()
    broken[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        K.knn_distance_mean(broken, 3)


# ---------------------------------------------------------------- multi-instance


@st.composite
def grid_masks(draw):
    side = draw(st.integers(2, 12))
    count = draw(st.integers(0, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    masks = np.zeros((count, side, side), bool)
    for m in masks:
        kind = draw(st.sampled_from(["box", "random", "empty"]))
        if kind == "box":
            y0, x0 = rng.integers(0, side, 2)
            y1, x1 = y0 + rng.integers(1, side + 1), x0 + rng.integers(1, side + 1)
            m[y0:y1, x0:x1] = True
        elif kind == "random":
            m[:] = rng.random((side, side)) < 0.3
    return masks


@settings(max_examples=60, deadline=None)
@given(masks=grid_masks(), channels=st.integers(1, 16), max_cells=st.sampled_from([0, 64]), seed=st.integers(0, 2**16))
def test_multi_instance_matches_twin(masks, channels, max_cells, seed):
    """Overlaps, nested and empty masks, one object; both the cell-pair and the per-object path."""
    side = masks.shape[1]
    features = unit_features(channels, side * side, seed, relu=bool(seed % 2))
    masks = masks.reshape(len(masks), side * side)
    got = K.multi_instance_distance(features, masks, block_bytes=1 << 10, max_cells=max_cells)
    np.testing.assert_allclose(got, K.multi_instance_distance_twin(features, masks), atol=ATOL, rtol=0)


def test_multi_instance_simple_case_by_hand():
    # Positions 0,1 object A, positions 2,3 object B; features e0,e0 | e0,e1.
    features = np.array([[1, 1, 1, 0], [0, 0, 0, 1]], np.float32)
    masks = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
    # A's positions find e0 in B: 0. B: position 2 (e0) finds e0 in A: 0; position 3 (e1): cos 0 -> 0.5.
    np.testing.assert_allclose(K.multi_instance_distance(features, masks), [0, 0, 0, 0.5], atol=1e-7)
    # An overlapping second object is seen as zero vectors: cosine 0 -> distance at most 0.5.
    overlapping = np.array([[1, 1, 1, 0], [0, 0, 1, 1]], bool)
    np.testing.assert_allclose(
        K.multi_instance_distance(features, overlapping), K.multi_instance_distance_twin(features, overlapping), atol=1e-7
    )


def test_multi_instance_where_the_reference_crashes():
    features = unit_features(6, 16, seed=4)
    one = np.zeros((1, 16), bool)
    one[0, :5] = True
    assert not K.multi_instance_distance(features, one).any()  # one object: nothing to compare, all 0
    empty_and_one = np.concatenate([one, np.zeros((2, 16), bool)])
    assert not K.multi_instance_distance(features, empty_and_one).any()
    two = np.concatenate([one, ~one, np.zeros((1, 16), bool)])  # an empty mask among two real ones is dropped
    np.testing.assert_allclose(K.multi_instance_distance(features, two), K.multi_instance_distance(features, two[:2]))
    assert K.multi_instance_distance(features, np.zeros((0, 16), bool)).shape == (16,)
    with pytest.raises(ValueError, match="positions"):
        K.multi_instance_distance(features, np.ones((2, 15), bool))
