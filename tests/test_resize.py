"""Images reach the models exactly as PIL (the reference's resize) would give them."""
import numpy as np
import pytest
from PIL import Image

from runtime.engine.resize import longest_side_shape, resize_like_pil, shorter_side_shape

CASES = [((300, 500), (120, 200)), ((100, 80), (256, 200)), ((1024, 768), (800, 600)), ((37, 53), (37, 800)),
         ((64, 64), (32, 32)), ((400, 200), (100, 300)), ((400, 200), (300, 100)), ((5, 7), (5, 7))]


@pytest.mark.parametrize("size_in, size_out", CASES)
@pytest.mark.parametrize("channels", [0, 3])
def test_equals_pil_bilinear(size_in, size_out, channels):
    rng = np.random.default_rng(sum(size_in) + channels)
    image = rng.integers(0, 256, size_in + ((channels,) if channels else ()), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize(size_out[::-1], Image.BILINEAR))
    got = resize_like_pil(image, size_out)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(resize_like_pil(image, size_out, twin=True), expected)


def test_shapes_follow_the_reference_transforms():
    assert longest_side_shape(600, 900, 1024) == (683, 1024)
    assert shorter_side_shape(600, 900, 800, 1333) == (800, 1200)
    assert shorter_side_shape(300, 1200, 800, 1333) == (333, 1332)  # int(333 * 4), as GroundingDINO's transform


@pytest.mark.parametrize("size_in, size_out", [((380, 488), (797, 1024)), ((200, 100), (50, 50)), ((100, 100), (50, 200)),
                                               ((100, 100), (50, 51)), ((100, 200), (50, 50)), ((100, 100), (200, 50))])
def test_pass_order_follows_pillow(size_in, size_out):
    image = np.random.default_rng(7).integers(0, 256, size_in + (3,), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize(size_out[::-1], Image.BILINEAR))
    np.testing.assert_array_equal(resize_like_pil(image, size_out), expected)
