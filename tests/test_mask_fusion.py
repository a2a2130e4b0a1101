"""Rescoring sums and top-K fusion on the device (runtime/stages/mask_fusion.py) against runtime/stages/fusion.py.

The graphs run here on onnxruntime's CPU provider over masks held as OrtValues, as the GPU
pipeline holds them; the CUDA run is the `gpu`-marked test.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import EngineError
from runtime.stages.fusion import fuse_masks_numpy, mean_inside_masks_numpy, top_k_indices
from runtime.stages.mask_fusion import DeviceMasks, MaskFusion


@pytest.fixture(scope="module")
def fusion() -> MaskFusion:
    return MaskFusion("cpu")


def device_masks(masks: np.ndarray, chunk: int, device: str = "cpu") -> DeviceMasks:
    chunks = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(masks[i:i + chunk]), device, 0)
              for i in range(0, len(masks), chunk)]
    return DeviceMasks(chunks, masks.shape[1], masks.shape[2], device)


def random_masks(count: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, height, width), bool)
    for mask in masks:
        kind = rng.integers(3)
        if kind == 0:
            y, x = rng.integers(0, height), rng.integers(0, width)
            mask[y:y + rng.integers(1, height + 1), x:x + rng.integers(1, width + 1)] = True
        elif kind == 1:
            mask[:] = rng.random((height, width)) < 0.3  # kind 2: empty
    return masks


@settings(max_examples=40, deadline=None)
@given(count=st.integers(0, 9), height=st.integers(1, 23), width=st.integers(1, 23), chunk=st.integers(1, 5),
       top_k=st.integers(1, 6), plus_one=st.booleans(), seed=st.integers(0, 2**16))
def test_device_sums_and_fusion_match_the_definitions(fusion, count, height, width, chunk, top_k, plus_one, seed):
    masks = random_masks(count, height, width, seed)
    rng = np.random.default_rng(seed + 1)
    saliency = rng.random((height, width), dtype=np.float32)
    on_device = device_masks(masks, chunk)
    assert on_device.shape == masks.shape and np.array_equal(on_device.to_host(), masks)
    means, areas = fusion.mean_inside_masks(saliency, on_device)
    expected_means, expected_areas = mean_inside_masks_numpy(saliency, masks)
    np.testing.assert_array_equal(areas, expected_areas)
    np.testing.assert_allclose(means, expected_means, rtol=1e-5, atol=1e-7)  # float32 sums on the device
    scores = rng.random(count) + 0.1
    keep = top_k_indices(scores, top_k)  # may span several chunks
    got = fusion.fuse_masks(on_device, keep, scores[keep], plus_one)
    assert got.dtype == np.float32 and got.shape == (height, width)
    np.testing.assert_allclose(got, fuse_masks_numpy(masks[keep], scores[keep], plus_one), rtol=1e-6, atol=1e-7)


def test_fusion_by_hand(fusion):
    masks = np.zeros((3, 2, 3), bool)
    masks[0, 0] = True           # top row
    masks[1, :, 0] = True        # left column
    masks[2, 1, 2] = True
    saliency = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    on_device = device_masks(masks, chunk=2)
    means, areas = fusion.mean_inside_masks(saliency, on_device)
    np.testing.assert_allclose(means, [2.0, 2.5, 6.0])
    assert areas.tolist() == [3, 2, 1]
    keep, scores = np.array([0, 1, 2]), np.array([0.6, 0.3, 0.9])
    plus_one = fusion.fuse_masks(on_device, keep, scores, plus_one=True)
    np.testing.assert_allclose(plus_one, [[0.9 / 3, 0.3, 0.3], [0.15, 0, 0.45]], rtol=1e-6)
    mean_only = fusion.fuse_masks(on_device, keep, scores, plus_one=False)
    np.testing.assert_allclose(mean_only, [[0.45, 0.6, 0.6], [0.3, 0, 0.9]], rtol=1e-6)
    np.testing.assert_array_equal(fusion.fuse_masks(on_device, keep[:0], scores[:0]), np.zeros((2, 3)))


def test_no_masks(fusion):
    empty = DeviceMasks([], 4, 5, "cpu")
    means, areas = fusion.mean_inside_masks(np.zeros((4, 5), np.float32), empty)
    assert means.shape == areas.shape == (0,) and empty.to_host().shape == (0, 4, 5)


def test_bad_inputs_name_the_problem(fusion):
    on_device = device_masks(np.ones((2, 4, 5), bool), chunk=2)
    with pytest.raises(EngineError, match=r"saliency of shape \[4, 6\] does not match masks of 4x5"):
        fusion.mean_inside_masks(np.zeros((4, 6), np.float32), on_device)
    with pytest.raises(EngineError, match="2 kept masks but 1 scores"):
        fusion.fuse_masks(on_device, np.array([0, 1]), np.array([1.0]))
    with pytest.raises(EngineError, match="kept index out of range for 2 masks"):
        fusion.fuse_masks(on_device, np.array([2]), np.array([1.0]))
    with pytest.raises(EngineError, match="needs DeviceMasks, got ndarray"):
        fusion.mean_inside_masks(np.zeros((4, 5), np.float32), np.ones((2, 4, 5), bool))


@pytest.mark.gpu
def test_cuda_fusion_matches_the_cpu_provider(fusion):
    masks = random_masks(40, 300, 400, seed=3)
    saliency = np.random.default_rng(4).random((300, 400), dtype=np.float32)
    cuda = MaskFusion("cuda")
    scores = np.random.default_rng(5).random(40) + 0.1
    keep = top_k_indices(scores, 5)
    for runner, held in ((fusion, device_masks(masks, 16)), (cuda, device_masks(masks, 16, "cuda"))):
        means, areas = runner.mean_inside_masks(saliency, held)
        np.testing.assert_array_equal(areas, masks.reshape(40, -1).sum(axis=1))
        np.testing.assert_allclose(means, mean_inside_masks_numpy(saliency, masks)[0], rtol=1e-5)
        np.testing.assert_allclose(runner.fuse_masks(held, keep, scores[keep]),
                                   fuse_masks_numpy(masks[keep], scores[keep]), rtol=1e-6)
