"""Reading images from disk or memory into the one layout the pipeline takes: uint8 HxWx3 BGR.

Cameras and files hand us grayscale, 16-bit, alpha channels and odd sizes; all are
converted here, once, and anything that cannot be a picture is refused with the
file's name in the message.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import cv2
import numpy as np

from .errors import ImageError, OutputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm", ".webp")
# Our own one-line errors replace OpenCV's decoder chatter on stderr.
try:
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
except AttributeError:  # builds without the logging module
    pass

LOW_DEPTH_MAX = 4096  # a 16-bit image whose values stay below 2^12 (Mono8/10/12 camera data) maps to 0..15


class LowBitDepthWarning(UserWarning):
    """A 16-bit image holds fewer significant bits than its type: taken as 16-bit, it is nearly black."""


MIN_SIDE = 2  # SAM, GroundingDINO and the saliency grid all need at least a 2x2 picture
MAX_PIXELS = 100_000_000  # 100 MP: beyond this a line camera frame is almost surely a mistake


# Any depth and colour layout as stored, turned upright by the file's EXIF orientation as the
# reference's cv2.imread does (IMREAD_UNCHANGED would skip that); an alpha channel is dropped.
IMAGE_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 HxWx3 BGR; raise ImageError naming the file otherwise."""
    path = Path(path)
    return to_bgr8(decode_file(path, IMAGE_FLAGS), source=str(path))


def decode_file(path: str | Path, flags: int) -> np.ndarray:
    """An image file decoded by OpenCV with `flags`; ImageError naming the file where it cannot be.
    The bytes are read by numpy: OpenCV's own file functions crash on names that are not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: a folder, not an image file")
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        raw = np.fromfile(str(path), dtype=np.uint8)
    except OSError as err:
        raise ImageError(f"{path}: cannot read ({err.strerror})") from None
    if raw.size == 0:
        raise ImageError(f"{path}: empty file")
    image = cv2.imdecode(raw, flags)
    if image is None:
        raise ImageError(f"{path}: not a readable image (corrupt, truncated or unsupported format)")
    return image


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Encode `image` in the format its suffix names and write it; OutputError naming the file
    where it cannot be (cv2.imwrite only returns False, and crashes on names that are not UTF-8)."""
    path = Path(path)
    try:
        ok, encoded = cv2.imencode(path.suffix, image)
    except cv2.error as err:
        raise OutputError(f"{path}: cannot encode the image ({str(err).strip().splitlines()[-1]})") from None
    if not ok:
        raise OutputError(f"{path}: cannot encode the image as {path.suffix}")
    write_bytes(path, encoded.tobytes())


def check_output_file(path: str | Path, what: str) -> Path:
    """Before long work: OutputError where the file `path` could not be written afterwards
    (its folder missing, not a folder, or not writable; the path itself a folder)."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder, not a file")
    if not folder.is_dir():
        raise OutputError(f"{what} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{what} {path}: the folder {folder} is not writable")
    return path


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path`; OutputError naming the file and the reason otherwise."""
    try:
        Path(path).write_bytes(data)
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror or err})") from None


def to_bgr8(image: np.ndarray, source: str = "image") -> np.ndarray:
    """Convert gray / BGRA / 16-bit / float arrays to contiguous uint8 HxWx3 BGR."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{source}: expected a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ImageError(f"{source}: unsupported shape {image.shape} (expected HxW, HxWx1, HxWx3 or HxWx4)")
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ImageError(f"{source}: image is {height} x {width} (height x width), smaller than {MIN_SIDE}x{MIN_SIDE}")
    if height * width > MAX_PIXELS:
        raise ImageError(f"{source}: image is {height} x {width} (height x width), more than "
                         f"{MAX_PIXELS // 1_000_000} megapixels")
    image = _to_uint8(image, source)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)  # alpha dropped, not blended: parts are photographed opaque
    return np.ascontiguousarray(image)


def _to_uint8(image: np.ndarray, source: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        top = int(image.max(initial=0))
        if 0 < top < LOW_DEPTH_MAX:
            bits = top.bit_length()
            warnings.warn(f"{source}: 16-bit image uses only {bits} bits (max {top}); keeping its top 8 bits, as "
                          f"the reference's cv2.imread does, leaves it nearly black: scale it to 16 bits "
                          f"(<< {16 - bits}) first if it came from a {bits}-bit camera", LowBitDepthWarning,
                          stacklevel=3)
        return (image >> 8).astype(np.uint8)  # keep the top 8 bits, as viewers and cv2.imread do
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.floating):
        if not np.all(np.isfinite(image)):
            raise ImageError(f"{source}: float image contains NaN or infinity")
        scale = 255.0 if image.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(image * scale + 0.5, 0, 255).astype(np.uint8)
    raise ImageError(f"{source}: unsupported pixel type {image.dtype}")
