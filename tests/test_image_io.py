from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.errors import ImageError
from runtime.image_io import read_image, to_bgr8
from runtime.inputs import list_images


def test_layouts_become_bgr8(tmp_path):
    gray16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    out = read_image(tmp_path / "g16.png")
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], (gray16 >> 8).astype(np.uint8))
    bgra = np.zeros((5, 6, 4), np.uint8)
    bgra[..., 2] = 200
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    assert read_image(tmp_path / "a.png")[0, 0].tolist() == [0, 0, 200]
    assert to_bgr8(np.ones((4, 4), np.float32)).max() == 255


@pytest.mark.parametrize("content, message", [(b"", "empty file"), (b"not an image at all", "not a readable image")])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        read_image(path)


def test_truncated_png(tmp_path):
    ok, data = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / "cut.png"
    path.write_bytes(data.tobytes()[:200])
    with pytest.raises(ImageError, match="cut.png"):
        read_image(path)


def test_tiny_huge_and_odd_shapes():
    with pytest.raises(ImageError, match="smaller than"):
        to_bgr8(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(ImageError, match="unsupported shape"):
        to_bgr8(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="megapixels"):
        to_bgr8(np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (20000, 10000), (0, 0)))
    with pytest.raises(ImageError, match="NaN"):
        to_bgr8(np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ImageError, match="no such file"):
        read_image("/nonexistent/x.png")
    with pytest.raises(ImageError, match="a folder, not an image file"):
        read_image(Path(__file__).parent)


def test_list_images(tmp_path):
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_images([tmp_path])] == ["a.jpg", "b.png"]
    (tmp_path / "a.png").write_bytes(b"x")  # a.jpg's mask (MTD's layout)
    (tmp_path / "b_mask.png").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_map.png").write_bytes(b"x")
    assert [p.name for p in list_images([tmp_path], exclude=tmp_path / "out")] == ["a.jpg", "b.png"]
    assert [p.name for p in list_images([tmp_path / "a.png"])] == ["a.png"]  # named one by one: always kept


def test_exif_orientation_is_applied_as_cv2_imread_does(tmp_path):
    """Phones and some cameras store JPEGs sideways with an EXIF Orientation tag; the reference
    reads with cv2.imread, which turns them upright, so the runtime does too."""
    import struct

    picture = np.zeros((20, 40, 3), np.uint8)
    picture[:, :10] = 255  # a bright left edge
    jpeg = cv2.imencode(".jpg", picture)[1].tobytes()
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack("<I", 0)
    exif = b"Exif\x00\x00" + tiff  # one IFD entry: Orientation = 6 (rotate 90 degrees clockwise)
    path = tmp_path / "sideways.jpg"
    path.write_bytes(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + jpeg[2:])
    upright = read_image(path)
    assert upright.shape == cv2.imread(str(path)).shape == (40, 20, 3)
    np.testing.assert_array_equal(upright, cv2.imread(str(path)))


def test_sixteen_bit_images_with_few_bits_are_taken_as_the_reference_does_with_a_warning():
    """12-bit camera data in a 16-bit file keeps its top 8 bits (0..15), as cv2.imread does: the
    map matches the reference, and the user is told why the picture is dark."""
    from runtime.image_io import LowBitDepthWarning

    twelve = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 64)  # 0..4032
    with pytest.warns(LowBitDepthWarning, match="uses only 12 bits.*<< 4"):
        dark = to_bgr8(twelve)
    assert dark.max() == 15
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_bgr8(twelve << 4).max() == 252  # the full 16-bit range: no warning
