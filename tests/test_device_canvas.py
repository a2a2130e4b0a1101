"""runtime.engine.device_canvas: the image graphs' input canvas made by a built-in graph, the host path's to the bit."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.engine import device_canvas as D
from runtime.errors import EngineError
from runtime.engine.pixels import normalised_canvas
from runtime.engine.resize import resize_like_pil, vertical_pass_first

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SIZES = [  # (image, content): shrink, enlarge, one side kept, both kept, the vertical pass first
    ((90, 90), (80, 80)), ((60, 100), (48, 80)), ((33, 51), (70, 79)), ((37, 80), (37, 80)),
    ((80, 80), (80, 80)), ((240, 90), (80, 60)), ((7, 300), (3, 80)),
]


@pytest.mark.parametrize("image_hw, content_hw", SIZES)
def test_the_canvas_is_the_host_paths_to_the_bit(image_hw, content_hw):
    image = np.random.default_rng(sum(image_hw)).integers(0, 256, (*image_hw, 3), dtype=np.uint8)
    canvas = D.DeviceCanvas("cpu", (80, 80), MEAN, STD, divisor=255.0)
    want = normalised_canvas(resize_like_pil(image, content_hw), (80, 80), MEAN, STD, divisor=255.0)
    np.testing.assert_array_equal(canvas(image, content_hw).numpy(), want)


def test_both_pass_orders_are_covered():
    assert {vertical_pass_first(image, content) for image, content in SIZES} == {True, False}


def test_one_buffer_every_call_and_a_bounded_size_cache():
    canvas = D.DeviceCanvas("cpu", (64, 64), MEAN, STD)
    rng = np.random.default_rng(0)
    buffers = set()
    for side in range(20, 20 + D.KEPT_SIZES + 3):
        image = rng.integers(0, 256, (side, side + 1, 3), dtype=np.uint8)
        out = canvas(image, (side, side + 1))
        buffers.add(out.data_ptr())
        want = normalised_canvas(resize_like_pil(image, (side, side + 1)), (64, 64), MEAN, STD)
        np.testing.assert_array_equal(out.numpy(), want)  # nothing left of the previous, larger image
    assert len(buffers) == 1 and len(canvas._per_size) == D.KEPT_SIZES
    with pytest.raises(ValueError, match="does not fit"):
        canvas(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8), (65, 10))


def test_an_onnxruntime_failure_is_an_engine_error(monkeypatch):
    canvas = D.DeviceCanvas("cpu", (32, 32), MEAN, STD)
    canvas(np.zeros((16, 16, 3), np.uint8), (16, 16))  # opens the session
    ((session, _),) = canvas._graphs.values()

    def broken(binding):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory")

    monkeypatch.setattr(session, "run_with_iobinding", broken)
    with pytest.raises(EngineError, match="device canvas"):
        canvas(np.zeros((16, 16, 3), np.uint8), (16, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("image_hw, content_hw", [((900, 900), (800, 800)), ((2400, 900), (800, 300)), ((600, 1000), (480, 800))])
def test_on_the_device_the_canvas_is_the_host_paths_to_the_bit(image_hw, content_hw):
    image = np.random.default_rng(1).integers(0, 256, (*image_hw, 3), dtype=np.uint8)
    canvas = D.DeviceCanvas("cuda", (800, 800), MEAN, STD, divisor=255.0)
    want = normalised_canvas(resize_like_pil(image, content_hw), (800, 800), MEAN, STD, divisor=255.0)
    got = canvas(image, content_hw).numpy()
    assert np.array_equal(got, want), f"max |diff| {np.abs(got - want).max()} on {np.mean(got != want):.2%} of values"
