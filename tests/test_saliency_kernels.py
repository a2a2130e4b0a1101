"""The saliency kNN kernels against their plain-numpy twins (the definition of correct)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.stages import saliency_kernels as K
from runtime.engine.sessions import builtin_graph

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


# ---------------------------------------------------------------- symmetric path (long rows)


def run_symmetric(features, n, mode, exclude_self, panel_rows=64, capacity=None):
    positions = features.shape[1]
    k = K._effective_n(n, positions, exclude_self)
    out = np.zeros(positions, np.float32)
    sign = np.float32(1.0 if mode == "farthest" else -1.0)
    return K._knn_symmetric(features, k, sign, exclude_self, out, panel_rows=panel_rows, capacity=capacity)


@pytest.mark.parametrize("mode", K.MODES)
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize(("positions", "panel_rows", "levels"), [(1030, 64, 0), (1200, 32, 0), (1100, 128, 3)])
def test_symmetric_path_matches_twin(mode, exclude_self, positions, panel_rows, levels):
    """Panels that do not divide P, a last row group shorter than 16, heavy ties (levels=3)."""
    features = unit_features(12, positions, seed=positions, levels=levels)
    got = run_symmetric(features, 300, mode, exclude_self, panel_rows)
    np.testing.assert_allclose(got, K.knn_distance_mean_twin(features, 300, mode, exclude_self), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pivot", [-2.0, 0.0, 0.3, 2.0])  # below all, inside, above all
@pytest.mark.parametrize("levels", [0, 4])
def test_select_smallest_near_a_guess(pivot, levels):
    rng = np.random.default_rng(int(10 * pivot) + 20 + levels)
    values = rng.uniform(-1, 1, 777).astype(np.float32)
    if levels:
        values = (np.round(values * levels) / levels).astype(np.float32)
    for k in (1, 100, 400, 777):
        buf = values.copy()
        K._select_smallest_near(buf, len(buf), k, np.float32(pivot))
        assert np.sort(buf[:k]).tolist() == np.sort(values)[:k].tolist()


def test_symmetric_path_redoes_rows_that_overflow():
    features = unit_features(10, 1040, seed=5)
    twin = K.knn_distance_mean_twin(features, 200, "farthest", False)
    # room for only a few more candidates than needed: most rows overflow and are recomputed alone
    np.testing.assert_allclose(run_symmetric(features, 200, "farthest", False, capacity=205), twin, atol=ATOL, rtol=0)


def test_symmetric_path_redoes_rows_the_sample_misled():
    """Every sampled position points away from the rest: the guessed threshold keeps < k candidates."""
    positions = 1300
    rng = np.random.default_rng(6)
    features = np.tile(np.array([[1.0], [0.0], [0.0]], np.float32), (1, positions))
    features += 0.3 * rng.standard_normal(features.shape).astype(np.float32)
    picks = (np.arange(K._SAMPLE) * K._SAMPLE_STEP) % positions
    features[:, picks] = -np.abs(features[:, picks])
    features /= np.linalg.norm(features, axis=0, keepdims=True)
    got = run_symmetric(features, 400, "farthest", False)
    np.testing.assert_allclose(got, K.knn_distance_mean_twin(features, 400, "farthest", False), atol=ATOL, rtol=0)


def test_knn_takes_the_symmetric_path_on_a_real_grid(monkeypatch):
    calls = []
    real = K._knn_symmetric
    monkeypatch.setattr(K, "_knn_symmetric", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    features = unit_features(16, 4096, seed=8)
    K.knn_distance_mean(features, 400)
    assert calls
    calls.clear()
    K.knn_distance_mean(features[:, :500], 400)  # short rows: the row-block path
    assert not calls


@pytest.mark.parametrize("backend", K.GEMM_BACKENDS)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 1), (7, 130, 33), (256, 1000, 176)])
def test_gemm_transposed(backend, m, n, k):
    rng = np.random.default_rng(m + n + k)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    out = np.full((m, n), np.nan, np.float32)
    K.gemm_transposed(a, b, out, backend)
    np.testing.assert_allclose(out, a.astype(np.float64) @ b.T.astype(np.float64), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemm_session_blocks_between_runs_and_pins_its_workers(threads, monkeypatch):
    from runtime.engine.sessions import worker_affinities

    monkeypatch.setattr(K, "_gemm_sessions", {})
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(threads)), raising=False)
    options = K._gemm_session(threads).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == threads
    if threads > 1:  # the runtime's rule: the workers pinned when the threads take every CPU
        assert options.get_session_config_entry("session.intra_op_thread_affinities") == worker_affinities(threads)


def test_gemm_graph_is_one_transposed_gemm():
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(builtin_graph("gemm_transposed"))
    onnx.checker.check_model(model)
    (node,) = model.graph.node
    assert node.op_type == "Gemm" and [a.i for a in node.attribute if a.name == "transB"] == [1]
    assert [i.name for i in model.graph.input] == ["a", "b"] and [o.name for o in model.graph.output] == ["y"]


@pytest.mark.parametrize("mode", K.MODES)
@pytest.mark.parametrize("exclude_self", [None, True, False])
@pytest.mark.parametrize(("positions", "n"), [(300, 40), (1100, 400), (5, 50), (1, 3)])
def test_knn_graph_matches_twin_on_the_cpu_provider(mode, exclude_self, positions, n):
    """The GPU path's ONNX graph, run by the CPU provider here (the CUDA run waits for a GPU)."""
    features = unit_features(16, positions, seed=positions)
    session = K.knn_session("cpu")
    got = K.knn_distance_mean_graph(features, n, mode, exclude_self, session=session)
    np.testing.assert_allclose(got, K.knn_distance_mean_twin(features, n, mode, exclude_self), atol=2e-6, rtol=0)


def test_knn_graph_takes_the_cnn_output_where_it_is():
    """An OrtValue [1, C, H, W] (the CNN's output left on the device) gives the same means as the
    [C, H*W] array; NaN features are refused there too, from the graph's feature sum."""
    ort = pytest.importorskip("onnxruntime")
    session = K.knn_session("cpu")
    features = unit_features(16, 6 * 7, seed=3)
    as_cnn_output = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(features.reshape(1, 16, 6, 7)))
    for mode in K.MODES:
        np.testing.assert_allclose(K.knn_distance_mean_graph(as_cnn_output, 10, mode, session=session),
                                   K.knn_distance_mean_twin(features, 10, mode), atol=2e-6, rtol=0)
    broken = features.reshape(1, 16, 6, 7).copy()
    broken[0, 3, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        K.knn_distance_mean_graph(ort.OrtValue.ortvalue_from_numpy(broken), 10, session=session)
    with pytest.raises(ValueError, match=r"must be \[1, C, H, W\]"):
        K.knn_distance_mean_graph(ort.OrtValue.ortvalue_from_numpy(features), 10, session=session)


def test_knn_graph_checks():
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(builtin_graph("knn_distance_mean"))
    onnx.checker.check_model(model)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("TopK") == 1 and "EyeLike" in ops and ops[-1] == "ReduceMean"
    top_k = next(node for node in model.graph.node if node.op_type == "TopK")
    assert {a.name: a.i for a in top_k.attribute} == {"axis": 1, "largest": 0, "sorted": 0}


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


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (3, 5), (176, 4096), (1792, 64)])
def test_rows_of_is_the_transpose(shape):
    features = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    rows = K.rows_of(features)
    np.testing.assert_array_equal(rows, features.T)
    assert rows.dtype == np.float32 and rows.flags.c_contiguous
