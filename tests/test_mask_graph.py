"""SAM mask post-processing as an ONNX graph (runtime/stages/mask_graph.py) against the cv2 path.

The graph runs here on onnxruntime's CPU provider; the CUDA run is the `gpu`-marked test.
export/builtin_graphs.py is the graph's source; tests/test_builtin_graphs.py checks the file.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from runtime.stages import mask_graph as M
from runtime.errors import EngineError
from runtime.stages.segmenter import upscale_mask_logits
from runtime.engine.runners import DeviceRunner
from runtime.engine.sessions import builtin_graph

REPO = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 1024
MASK_SIZE = 256
# Unit-noise logits: cv2, onnxruntime and torch each put the source coordinate of a ~1000 px
# axis in float32 (ulp 6e-5 px), so their logits differ by up to ~6e-5 (measured), 1e-4 allowed.
LOGIT_TOL = 1e-4


def build_mask_upscale_graph(with_logits: bool = False) -> bytes:
    """The graph's source (export/builtin_graphs.py); with_logits adds the logits as an output."""
    pytest.importorskip("onnx")
    from export.builtin_graphs import mask_upscale

    return mask_upscale(with_logits)


@pytest.fixture(scope="module")
def runner() -> DeviceRunner:
    return DeviceRunner(M.mask_session("cpu"))


@pytest.fixture(scope="module")
def logits_session() -> ort.InferenceSession:
    return ort.InferenceSession(build_mask_upscale_graph(with_logits=True), providers=["CPUExecutionProvider"])


def graph_logits(session, low_res: np.ndarray, sizes: tuple[int, ...], threshold: float = 0.0) -> np.ndarray:
    feeds = {"low_res_masks": low_res, "sizes": np.array(sizes, np.int64), "threshold": np.array([threshold], np.float32)}
    return session.run(["logits"], feeds)[0]


def cv2_logits(low_res: np.ndarray, input_size, original_size, image_size: int = IMAGE_SIZE) -> np.ndarray:
    height, width = original_size
    out = np.empty((len(low_res), height, width), np.float32)
    for i, logits in enumerate(low_res[:, 0]):
        out[i] = upscale_mask_logits(logits, input_size, original_size, image_size)
    return out


def noise_logits(n: int, seed: int, side: int = MASK_SIZE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, side, side)).astype(np.float32)


def blob_logits(n: int, seed: int) -> np.ndarray:
    """SAM-like logits: smooth blobs crossing 0 (std 8, mean -4); measured max diff vs cv2 3e-5."""
    out = np.empty((n, 1, MASK_SIZE, MASK_SIZE), np.float32)
    for i, plane in enumerate(noise_logits(n, seed)[:, 0]):
        smooth = cv2.GaussianBlur(plane, (0, 0), 8)
        out[i, 0] = 8 * smooth / smooth.std() - 4
    return out


def bilinear_half_pixel(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Definition of F.interpolate(bilinear, align_corners=False) in float64: source coordinate
    (i + 0.5) * in / out - 0.5, clamped to [0, in - 1] (the edge pixel repeats, no zero padding)."""
    def axis_weights(size_in: int, size_out: int) -> np.ndarray:
        src = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, size_in - 1)
        w = np.zeros((size_out, size_in))
        np.add.at(w, (np.arange(size_out), lo), 1 - (src - lo))
        np.add.at(w, (np.arange(size_out), hi), src - lo)
        return w

    return axis_weights(x.shape[0], out_h) @ x.astype(np.float64) @ axis_weights(x.shape[1], out_w).T


# ---------------------------------------------------------------- the embedded graph


def test_graph_file_has_the_documented_interface():
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(builtin_graph("mask_upscale"))
    assert [i.name for i in model.graph.input] == list(M.GRAPH_INPUTS)
    assert [o.name for o in model.graph.output] == [M.GRAPH_OUTPUT]
    resizes = [node for node in model.graph.node if node.op_type == "Resize"]
    assert len(resizes) == 2 and model.opset_import[0].version == 17  # Resize-13: no antialias attribute
    for node in resizes:
        attributes = {a.name: a.s.decode() for a in node.attribute}
        assert attributes == {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}


# ---------------------------------------------------------------- one resize: edges and scales


@pytest.mark.parametrize(("side", "out_h", "out_w"), [(4, 8, 8), (3, 10, 7), (8, 4, 4), (7, 5, 5), (6, 6, 13), (5, 5, 5)])
def test_one_resize_clamps_at_edges_like_cv2_and_the_definition(logits_session, side, out_h, out_w):
    """image_size == input == m makes the first Resize an identity: the second one alone is tested.
    Up- and down-scales, the exact 2x down (where cv2 switches to INTER_AREA, equal there) and 1x."""
    x = noise_logits(2, seed=side * out_w, side=side)
    got = graph_logits(logits_session, x, (side, side, side, out_h, out_w))
    for plane, out in zip(x[:, 0], got):
        want = bilinear_half_pixel(plane, out_h, out_w)
        np.testing.assert_allclose(out, want, atol=2e-6, rtol=0)
        np.testing.assert_allclose(cv2.resize(plane, (out_w, out_h), interpolation=cv2.INTER_LINEAR), want, atol=2e-6, rtol=0)
    if out_h >= side:  # upscaling: corners are the input's corners (clamped, not blended with zeros)
        np.testing.assert_allclose(got[:, [0, -1]][:, :, [0, -1]], x[:, 0][:, [0, -1]][:, :, [0, -1]], atol=1e-6)


def test_logits_match_the_reference_postprocess_masks(logits_session):
    """segment_anything's own Sam.postprocess_masks (two F.interpolate calls) on the same logits."""
    torch = pytest.importorskip("torch")
    from segment_anything.modeling import Sam

    torch.set_num_threads(1)
    sam = SimpleNamespace(image_encoder=SimpleNamespace(img_size=IMAGE_SIZE))  # all postprocess_masks reads
    low_res = noise_logits(2, seed=3)
    input_size, original_size = (768, 1024), (600, 800)
    with torch.no_grad():
        want = Sam.postprocess_masks(sam, torch.from_numpy(low_res), input_size, original_size)[:, 0].numpy()
    got = graph_logits(logits_session, low_res, (IMAGE_SIZE, *input_size, *original_size))
    np.testing.assert_allclose(got, want, atol=2 * LOGIT_TOL, rtol=0)  # float32 coordinates on both sides


# ---------------------------------------------------------------- masks against the cv2 path


CASES = [  # (n, input_size, original_size, threshold)
    pytest.param(1, (1024, 1024), (1024, 1024), 0.0, id="upscale-only"),
    pytest.param(3, (1024, 1024), (900, 900), 0.0, id="downscale"),
    pytest.param(17, (768, 1024), (600, 800), 0.0, id="wide-17"),
    pytest.param(2, (1024, 512), (1000, 500), 0.0, id="tall"),
    pytest.param(1, (768, 1024), (1536, 2048), 0.0, id="larger-than-1024"),
    pytest.param(2, (1024, 1024), (512, 512), 0.5, id="2x-down-threshold-0.5"),
]


def assert_masks_match_cv2(masks: np.ndarray, low_res: np.ndarray, input_size, original_size, threshold: float,
                           band: float) -> np.ndarray:
    """Masks equal cv2's everywhere except where cv2's logit is within `band` of the threshold;
    returns cv2's logits."""
    reference = cv2_logits(low_res, input_size, original_size)
    assert masks.dtype == np.bool_ and masks.shape == reference.shape
    near = np.abs(reference - threshold) <= band
    np.testing.assert_array_equal(masks[~near], (reference > threshold)[~near])
    return reference


@pytest.mark.parametrize(("n", "input_size", "original_size", "threshold"), CASES)
def test_masks_match_cv2_on_noise(runner, logits_session, n, input_size, original_size, threshold):
    low_res = noise_logits(n, seed=n + original_size[0])
    masks = M.upscale_masks_graph(low_res, input_size, original_size, IMAGE_SIZE, threshold, runner)
    reference = assert_masks_match_cv2(masks, low_res, input_size, original_size, threshold, LOGIT_TOL)
    logits = graph_logits(logits_session, low_res, (IMAGE_SIZE, *input_size, *original_size), threshold)
    np.testing.assert_array_equal(masks, logits > np.float32(threshold))  # same graph, logits kept
    assert np.abs(logits - reference).max() <= LOGIT_TOL


def test_masks_match_cv2_on_sam_like_logits(runner, logits_session):
    low_res = blob_logits(5, seed=11)
    input_size, original_size = (1024, 683), (900, 600)
    masks = M.upscale_masks_graph(low_res, input_size, original_size, IMAGE_SIZE, 0.0, runner)
    reference = assert_masks_match_cv2(masks, low_res, input_size, original_size, 0.0, LOGIT_TOL)
    assert 0.1 < (reference > 0).mean() < 0.9  # the masks hold edges, not all one value
    logits = graph_logits(logits_session, low_res, (IMAGE_SIZE, *input_size, *original_size))
    assert np.abs(logits - reference).max() <= LOGIT_TOL


def test_device_values_are_accepted(runner):
    """The decoder's output kept as an OrtValue (on the device under CUDA) feeds the graph as is."""
    low_res = noise_logits(2, seed=5)
    from_numpy = M.upscale_masks_graph(low_res, (768, 1024), (600, 800), IMAGE_SIZE, 0.0, runner)
    from_value = M.upscale_masks_graph(ort.OrtValue.ortvalue_from_numpy(low_res), (768, 1024), (600, 800),
                                       IMAGE_SIZE, 0.0, runner)
    np.testing.assert_array_equal(from_value, from_numpy)


def test_no_boxes_give_empty_masks_without_a_run():
    class Unused:
        def run(self, *args, **kwargs):
            raise AssertionError("the graph ran for zero boxes")

    masks = M.upscale_masks_graph(np.zeros((0, 1, MASK_SIZE, MASK_SIZE), np.float32), (768, 1024), (600, 800),
                                  IMAGE_SIZE, 0.0, Unused())
    assert masks.shape == (0, 600, 800) and masks.dtype == np.bool_


@pytest.mark.parametrize(("low_res", "input_size", "original_size", "message"), [
    (np.zeros((2, MASK_SIZE, MASK_SIZE), np.float32), (1024, 1024), (10, 10), r"\[n, 1, m, m\], got \[2, 256, 256\]"),
    (np.zeros((2, 3, MASK_SIZE, MASK_SIZE), np.float32), (1024, 1024), (10, 10), r"got \[2, 3, 256, 256\]"),
    (np.zeros((2, 1, MASK_SIZE, 128), np.float32), (1024, 1024), (10, 10), r"got \[2, 1, 256, 128\]"),
    (np.zeros((1, 1, 4, 4), np.float32), (1025, 1024), (10, 10), "must fit in image_size 1024"),
    (np.zeros((1, 1, 4, 4), np.float32), (1024, 1024), (0, 10), "original_size 0x10 is empty"),
    (np.zeros((1, 1, 4, 4), np.float32), (1024,), (10, 10), r"input_size must be \(height, width\)"),
    ([[0.0]], (1024, 1024), (10, 10), "numpy array or an OrtValue, got list"),
    (ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, 4, 4), np.int64)), (8, 8), (10, 10), "float32 logits"),
])
def test_bad_inputs_name_the_problem(runner, low_res, input_size, original_size, message):
    with pytest.raises(EngineError, match=message):
        M.upscale_masks_graph(low_res, input_size, original_size, IMAGE_SIZE, 0.0, runner)


def test_runtime_module_imports_neither_torch_nor_onnx():
    code = ("import sys, runtime.stages.mask_graph as M; M.mask_session('cpu'); "
            "sys.exit(1 if {'torch', 'onnx'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.gpu
def test_cuda_masks_match_the_cpu_provider(runner):
    cuda = DeviceRunner(M.mask_session("cuda"))
    low_res = blob_logits(17, seed=2)
    args = ((768, 1024), (600, 800), IMAGE_SIZE, 0.0)
    on_gpu = M.upscale_masks_graph(ort.OrtValue.ortvalue_from_numpy(low_res, "cuda", 0), *args, cuda)
    assert_masks_match_cv2(on_gpu, low_res, *args[:2], 0.0, LOGIT_TOL)
    assert (on_gpu != M.upscale_masks_graph(low_res, *args, runner)).mean() < 1e-5
