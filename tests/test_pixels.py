"""The numba normalisation pass equals the numpy float32 expressions of the reference's transforms."""
import numpy as np
import pytest

from runtime.engine.pixels import normalised_canvas

SAM_MEAN, SAM_STD = np.array([123.675, 116.28, 103.53], np.float32), np.array([58.395, 57.12, 57.375], np.float32)
DINO_MEAN, DINO_STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


@pytest.mark.parametrize("shape, canvas", [((683, 1024), (1024, 1024)), ((37, 5), (40, 8)), ((16, 16), (16, 16))])
def test_bit_equal_to_the_numpy_transforms(shape, canvas):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape + (3,), dtype=np.uint8)
    h, w = shape
    sam = np.zeros((3,) + canvas, np.float32)
    sam[:, :h, :w] = ((image.astype(np.float32) - SAM_MEAN) / SAM_STD).transpose(2, 0, 1)
    np.testing.assert_array_equal(normalised_canvas(image, canvas, SAM_MEAN, SAM_STD), sam[None])
    dino = np.zeros((3,) + canvas, np.float32)
    dino[:, :h, :w] = ((image.astype(np.float32) / np.float32(255.0) - DINO_MEAN) / DINO_STD).transpose(2, 0, 1)
    got = normalised_canvas(image, canvas, DINO_MEAN, DINO_STD, divisor=255.0)
    assert got.dtype == np.float32 and got.shape == (1, 3) + canvas
    np.testing.assert_array_equal(got, dino[None])


def test_an_image_larger_than_the_canvas_or_a_wrong_mean_is_refused():
    with pytest.raises(ValueError, match="does not fit a 8x8 canvas"):
        normalised_canvas(np.zeros((9, 8, 3), np.uint8), (8, 8), SAM_MEAN, SAM_STD)
    with pytest.raises(ValueError, match="3-channel image with 2 means"):
        normalised_canvas(np.zeros((8, 8, 3), np.uint8), (8, 8), SAM_MEAN[:2], SAM_STD)
    # (1, 1, 3)-shaped statistics, as the saliency extractor keeps them, are the same three values
    image = np.full((2, 2, 3), 200, np.uint8)
    np.testing.assert_array_equal(normalised_canvas(image, (2, 2), SAM_MEAN.reshape(1, 1, 3), SAM_STD.reshape(1, 1, 3)),
                                  normalised_canvas(image, (2, 2), SAM_MEAN, SAM_STD))
