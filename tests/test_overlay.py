"""runtime/overlay.py: the overlay's text stays readable from MTD tiles to line-scan frames."""
import numpy as np
import pytest

from runtime.overlay import put_text, text_scale


def test_text_is_sized_to_the_image():
    assert text_scale((600, 900, 3)) == pytest.approx(0.45)
    assert text_scale((115, 260, 3)) == 0.3 and text_scale((6000, 8000, 3)) == 4.0


def test_a_line_near_the_right_edge_moves_left_and_a_wide_one_shrinks():
    picture = np.zeros((60, 120, 3), np.uint8)
    put_text(picture, "black hole 0.93", (100, 30), 0.4)
    columns = np.flatnonzero(picture.any(axis=(0, 2)))
    assert columns[0] < 60 and columns[-1] < 120  # moved left to fit, not cut at the edge
    wide = np.zeros((60, 120, 3), np.uint8)
    put_text(wide, "NG 0.966, max 0.966 and much more text", (4, 30), 0.45)
    columns = np.flatnonzero(wide.any(axis=(0, 2)))
    assert columns[0] <= 6 and columns[-1] <= 118  # the whole line on the picture
