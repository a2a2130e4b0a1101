"""Reading images from disk or memory into the one layout the pipeline takes: uint8 HxWx3 BGR.

Cameras and files hand us grayscale, 16-bit, alpha channels and odd sizes; all are
converted here, once, and anything that cannot be a picture is refused with the
file's name in the message.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm", ".webp")
# Our own one-line errors replace OpenCV's decoder chatter on stderr.
try:
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
except AttributeError:  # builds without the logging module
    pass

MIN_SIDE = 2  # SAM, GroundingDINO and the saliency grid all need at least a 2x2 picture
MAX_PIXELS = 100_000_000  # 100 MP: beyond this a line camera frame is almost surely a mistake


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 HxWx3 BGR; raise ImageError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        raw = np.fromfile(str(path), dtype=np.uint8)
    except OSError as err:
        raise ImageError(f"{path}: cannot read ({err.strerror})") from None
    if raw.size == 0:
        raise ImageError(f"{path}: empty file")
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{path}: not a readable image (corrupt, truncated or unsupported format)")
    return to_bgr8(image, source=str(path))


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
        raise ImageError(f"{source}: image is {width}x{height}, smaller than {MIN_SIDE}x{MIN_SIDE}")
    if height * width > MAX_PIXELS:
        raise ImageError(f"{source}: image is {width}x{height}, more than {MAX_PIXELS // 1_000_000} megapixels")
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
        return (image >> 8).astype(np.uint8)  # keep the top 8 bits, as viewers show 16-bit files
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.floating):
        if not np.all(np.isfinite(image)):
            raise ImageError(f"{source}: float image contains NaN or infinity")
        scale = 255.0 if image.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(image * scale + 0.5, 0, 255).astype(np.uint8)
    raise ImageError(f"{source}: unsupported pixel type {image.dtype}")


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into image paths; missing inputs are kept
    so the caller reports them as per-file failures."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                               and not any(part.startswith(".") for part in p.relative_to(item).parts)))
        else:
            paths.append(item)
    return list(dict.fromkeys(paths))  # a file named twice is processed once
