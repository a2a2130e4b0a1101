"""Runtime saliency (onnxruntime + kernels, no torch) against the authors' PyTorch code on a real MTD image.

The CNN is EfficientNet-Lite0 with its real ImageNet weights (the `lite` profile), so
the maps are those of a real backbone. Tolerance: 1e-5 absolute on maps of about
0.1..0.6 (measured: a few 1e-7, the ONNX-vs-PyTorch feature difference).
"""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bench.reference.saliency import (
    reference_multi_grid,
    reference_multi_saliency,
    reference_single_grid,
    reference_single_saliency,
)
from export.saliency import build_saliency_cnn, export_lite_saliency
from runtime import manifest as mf
from runtime.errors import ConfigError, EngineError, ImageError, ManifestError
from runtime.stages.saliency import SaliencyExtractor, SaliencySettings

IMAGE = Path(__file__).parent / "data" / "mtd_break_exp6_num_348888.jpg"
TOLERANCE = 1e-5

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    out = tmp_path_factory.mktemp("lite_saliency")
    models, preprocess = export_lite_saliency(out)
    data = {
        "format_version": mf.FORMAT_VERSION,
        "profile": "lite",
        "models": {m.name: m.manifest_entry() for m in models},
        "preprocess": {"saliency": preprocess},
    }
    manifest = mf.Manifest(engine_dir=out, data=data)
    return manifest, SaliencyExtractor(manifest), build_saliency_cnn("efficientnet_lite0")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    picture = cv2.imread(str(IMAGE))  # BGR, as the reference reads it
    assert picture is not None and picture.shape == (380, 488, 3)
    return picture


def object_masks(height: int, width: int) -> np.ndarray:
    """Three synthetic objects: two disjoint boxes and an ellipse overlapping the second."""
    masks = np.zeros((3, height, width), bool)
    masks[0, 30:110, 40:150] = True
    masks[1, 200:300, 60:170] = True
    cv2.ellipse(masks[2].view(np.uint8), (260, 250), (90, 50), 0, 0, 360, 1, -1)
    return masks


@pytest.mark.parametrize("mode", ["farthest", "nearest"])
def test_single_object_saliency_matches_reference(lite, image, mode):
    _, extractor, cnn = lite
    assert extractor.single_object_grid(image, mode=mode).shape == (64, 64)
    got = extractor.single_object_saliency(image, mode=mode)
    expected = reference_single_saliency(cnn, image, n=400, mode=mode)
    assert got.shape == image.shape[:2] and got.dtype == np.float32
    assert np.abs(got - expected).max() < TOLERANCE
    assert got.std() > 1e-3  # a real map, not a constant


def test_single_object_n_and_settings(lite, image):
    manifest, extractor, cnn = lite
    expected = reference_single_grid(cnn, image, n=50)
    assert np.abs(extractor.single_object_grid(image, n=50) - expected).max() < TOLERANCE
    other = SaliencyExtractor(manifest, settings=SaliencySettings(n=50, single_size=320))
    assert other.single_object_grid(image).shape == (80, 80)
    with pytest.raises(ConfigError, match="multiple of 16"):
        SaliencyExtractor(manifest, settings=SaliencySettings(single_size=250))
    with pytest.raises(ConfigError, match="mode"):
        extractor.single_object_saliency(image, mode="paper")


def test_multi_object_saliency_matches_reference(lite, image):
    _, extractor, cnn = lite
    masks = object_masks(*image.shape[:2])
    got = extractor.multi_object_saliency(image, masks)
    expected = reference_multi_saliency(cnn, image, masks)
    assert got.shape == image.shape[:2] and got.dtype == np.float32
    assert np.abs(got - expected).max() < TOLERANCE
    assert (got[~masks.any(axis=0)] < TOLERANCE).mean() > 0.9  # ~0 outside the objects (bilinear edges aside)
    assert got[masks[0]].mean() > 0.01


def test_multi_object_falls_back_where_the_reference_crashes(lite, image):
    _, extractor, cnn = lite
    height, width = image.shape[:2]
    one = object_masks(height, width)[:1]
    with pytest.raises(ValueError, match="reference crashes"):
        reference_multi_grid(cnn, image, one)
    single = extractor.single_object_saliency(image)
    np.testing.assert_array_equal(extractor.multi_object_saliency(image, one), single)
    # A one-pixel object that nearest resizing skips: empty on the grid, so again only one object.
    speck = next(m for m in (_pixel_mask(height, width, r, c) for r in range(6) for c in range(6))
                 if not extractor.grid_masks(m, 256).any())
    np.testing.assert_array_equal(extractor.multi_object_saliency(image, np.concatenate([one, speck])), single)


def _pixel_mask(height: int, width: int, row: int, col: int) -> np.ndarray:
    mask = np.zeros((1, height, width), bool)
    mask[0, row, col] = True
    return mask


def test_extractor_rejects_bad_input(lite, image):
    manifest, extractor, _ = lite
    with pytest.raises(ImageError, match="uint8 HxWx3"):
        extractor.single_object_saliency(image.astype(np.float32))
    with pytest.raises(ImageError, match="uint8 HxWx3"):
        extractor.single_object_saliency(image[:, :, 0])
    with pytest.raises(ImageError, match=r"\[M, H, W\]"):
        extractor.multi_object_saliency(image, np.zeros((2, 10, 10), bool))
    broken = mf.Manifest(engine_dir=manifest.engine_dir, data={**manifest.data, "preprocess": {}})
    with pytest.raises(ManifestError, match="preprocess\\['saliency'\\]"):
        SaliencyExtractor(broken)
    lying = {**manifest.data["preprocess"]["saliency"], "channels": 99}
    liar = SaliencyExtractor(mf.Manifest(engine_dir=manifest.engine_dir, data={**manifest.data, "preprocess": {"saliency": lying}}))
    with pytest.raises(EngineError, match="promises"):
        liar.single_object_saliency(image)


@pytest.mark.slow
def test_timing_single_object_saliency(lite, image):
    """Prints one-object saliency at 256 (64x64 grid, 4096 positions), runtime vs reference, 1 and 2 threads.

    "knn": features -> 4096 means (kernel: blocked BLAS + numba selection; reference: torch
    matmul + full descending sort); "map": image -> map at image size, CNN included.
    """
    import numba
    import threadpoolctl

    from runtime.stages.saliency_kernels import knn_distance_mean
    from runtime.engine.sessions import session_factory
    from runtime.settings import EngineSettings

    manifest, _, cnn = lite
    for threads in (1, 2):
        torch.set_num_threads(threads)
        numba.set_num_threads(threads)
        extractor = SaliencyExtractor(manifest, session_factory(EngineSettings(threads=threads)))
        with threadpoolctl.threadpool_limits(threads):
            features = extractor.features(image, 256)
            flat = features.reshape(features.shape[0], -1)
            tensor = torch.from_numpy(flat)

            def reference_knn() -> torch.Tensor:
                distance = 0.5 * (1 - tensor.T @ tensor)
                return torch.mean(distance.sort(dim=1, descending=True)[0][:, :400], dim=1)

            np.testing.assert_allclose(knn_distance_mean(flat, 400), reference_knn().numpy(), atol=TOLERANCE)
            timings = {
                "knn kernel": _best_ms(lambda: knn_distance_mean(flat, 400)),
                "knn torch sort": _best_ms(reference_knn),
                "map runtime": _best_ms(lambda: extractor.single_object_saliency(image)),
                "map reference": _best_ms(lambda: reference_single_saliency(cnn, image)),
            }
        print(f"\n[{threads} thread(s)] " + ", ".join(f"{k}: {v:.1f} ms" for k, v in timings.items()))
    torch.set_num_threads(1)


def _best_ms(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000
