"""The numba kernels of P^P and P^C equal their numpy twins, edge cases included."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from runtime.stages.fusion import fuse_masks, fuse_masks_numpy, mean_inside_masks, rescore, top_k_indices
from runtime.stages.regions import box_keep, box_keep_numpy, cxcywh_to_xyxy_pixels, select_regions


@settings(max_examples=60, deadline=None)
@given(queries=st.integers(0, 40), tokens=st.integers(1, 12), seed=st.integers(0, 10_000),
       threshold=st.sampled_from([0.0, 0.1, 0.5, 0.99]), max_area=st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.0]))
def test_box_keep_matches_twin(queries, tokens, seed, threshold, max_area):
    rng = np.random.default_rng(seed)
    logits = rng.random((queries, tokens), dtype=np.float32)
    boxes = rng.random((queries, 4), dtype=np.float32)
    boxes[: queries // 4, 2] = 0.0  # zero-area boxes are dropped by the min-area rule
    np.testing.assert_array_equal(box_keep(logits, boxes, threshold, 0.0, max_area),
                                  box_keep_numpy(logits, boxes, threshold, 0.0, max_area))


@settings(max_examples=60, deadline=None)
@given(count=st.integers(0, 8), height=st.integers(1, 12), width=st.integers(1, 12), seed=st.integers(0, 10_000),
       plus_one=st.booleans())
def test_fuse_matches_twin(count, height, width, seed, plus_one):
    rng = np.random.default_rng(seed)
    masks = rng.random((count, height, width)) > 0.6
    if count:
        masks[0] = False  # an empty mask among them
    scores = rng.random(count) * 5
    np.testing.assert_allclose(fuse_masks(masks, scores, plus_one), fuse_masks_numpy(masks, scores, plus_one), rtol=1e-12)


def test_fusion_denominators():
    masks = np.array([[[True, True, False]], [[True, False, False]]])
    scores = np.array([2.0, 4.0])
    # reference: weight map starts at 1
    np.testing.assert_allclose(fuse_masks(masks, scores, True), [[6 / 3, 2 / 2, 0]])
    # paper: plain weighted mean where covered
    np.testing.assert_allclose(fuse_masks(masks, scores, False), [[3, 2, 0]])


def test_rescore_empty_mask_keeps_score():
    saliency = np.full((2, 2), 0.5, np.float32)
    masks = np.array([np.ones((2, 2), bool), np.zeros((2, 2), bool)])
    means, areas = mean_inside_masks(saliency, masks)
    np.testing.assert_allclose(means, [0.5, 0.0])
    np.testing.assert_array_equal(areas, [4, 0])
    np.testing.assert_allclose(rescore(np.array([0.2, 0.3]), means, areas, 3.0), [0.2 * np.exp(1.5), 0.3])


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_more_than_regions(k):
    scores = np.array([0.3, 0.9, 0.1])
    picked = top_k_indices(scores, k)
    assert list(picked) == list(np.argsort(scores)[-k:])
    assert len(top_k_indices(np.zeros(0), k)) == 0


def test_select_regions_rules():
    logits = np.array([[0.05, 0.08], [0.5, 0.05], [0.6, 0.05], [0.9, 0.9]], np.float32)
    boxes = np.array([[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.0, 0.3], [0.5, 0.5, 0.9, 0.9]], np.float32)
    phrases = {(True, True): "bottle crack", (True, False): "crack"}
    regions = select_regions(logits, boxes, lambda m: phrases[tuple(bool(v) for v in m)], "bottle", 0, "crack",
                             (100, 200), 0.1, 0.1, 0.0, 0.5)
    # query 0: score too low; 2: zero area; 3: too large -> only query 1
    assert len(regions) == 1 and regions[0].phrase == "crack"
    assert regions[0].box == pytest.approx((80.0, 40.0, 120.0, 60.0))
    excluded = select_regions(logits, boxes, lambda m: "bottle crack", "bottle", 0, "crack", (100, 200), 0.1, 0.1, 0.0, 0.5)
    assert excluded == []


def test_cxcywh_to_pixels():
    np.testing.assert_allclose(cxcywh_to_xyxy_pixels(np.array([[0.5, 0.25, 0.5, 0.5]]), 100, 200), [[50, 0, 150, 50]])


@settings(max_examples=40, deadline=None)
@given(count=st.integers(0, 6), size=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_mask_means_match_twin(count, size, seed):
    from runtime.stages.fusion import mean_inside_masks_numpy

    rng = np.random.default_rng(seed)
    saliency = rng.random((size, size + 1), dtype=np.float32)
    masks = rng.random((count, size, size + 1)) > 0.5
    if count:
        masks[-1] = False
    got, got_areas = mean_inside_masks(saliency, masks)
    want, want_areas = mean_inside_masks_numpy(saliency, masks)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(got_areas, want_areas)
