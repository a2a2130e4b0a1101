"""ctypes binding of the C ABI (saa.h): the line-side library, driven from Python.

    from runtime.capi import CPipeline
    with CPipeline.open("engines/", dataset="mtd", category="mtd") as pipe:
        result = pipe(frame)          # uint8 HxW, HxWx3 (BGR) or HxWx4 (BGRA)
        result.anomaly_map, result.regions

It goes through libsaa.so exactly as a C++ program does, so test rigs see the line's
behaviour. A uint8 frame whose pixels are packed within rows (contiguous, or a crop with
row padding) is handed over without a copy; other arrays are converted first. Failures
raise CapiError carrying the ABI's status code and saa_last_error's message.
"""
from __future__ import annotations

import ctypes
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ImageError, SaaError
from .abi import (ABI_VERSION, E_BAD_HANDLE, E_CLOSED, E_CONFIG, E_ENGINE, E_ENGINES, E_IMAGE, E_INTERNAL,
                  E_INVALID_ARGUMENT, E_PYTHON, OK, PHRASE_CAPACITY, REGION_DTYPE, OpenOptions)

__all__ = ["CPipeline", "CapiError", "CapiRegion", "CapiResult", "load_library", "library_path", "header_dir",
           "version", "abi_version", "REGION_DTYPE", "PHRASE_CAPACITY", "OK", "E_INVALID_ARGUMENT", "E_BAD_HANDLE",
           "E_CLOSED", "E_ENGINES", "E_CONFIG", "E_IMAGE", "E_ENGINE", "E_PYTHON", "E_INTERNAL", "DEFAULT_MAX_REGIONS"]

DEFAULT_MAX_REGIONS = 64
HERE = Path(__file__).resolve().parent


class CapiError(SaaError):
    """A call through the C ABI failed: `status` is its SAA_E_* code (None: the library is missing)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CapiRegion:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels
    score: float
    mask_area: int
    prompt_index: int
    in_top_k: bool
    phrase: str


@dataclass
class CapiResult:
    anomaly_map: np.ndarray  # float32 [map_height, map_width]
    regions: list[CapiRegion]  # saa.h order: fused first, then the rest, each by score descending


def header_dir() -> Path:
    return HERE


def library_path() -> Path:
    return HERE / "libsaa.so"


_library: ctypes.CDLL | None = None
_library_lock = threading.Lock()


def load_library() -> ctypes.CDLL:
    """libsaa.so with its signatures declared (CDLL: the GIL is released during each call)."""
    global _library
    with _library_lock:
        if _library is None:
            path = library_path()
            if not path.is_file():
                raise CapiError(None, f"{path} is not built: run `pip install -e .` "
                                      "or `python -m runtime.capi --build`")
            try:
                library = ctypes.CDLL(str(path))
            except OSError as err:
                raise CapiError(None, f"{path}: cannot load ({err})") from None
            _declare(library)
            if library.saa_abi_version() != ABI_VERSION:
                raise CapiError(None, f"{path} speaks C ABI {library.saa_abi_version()}, this binding {ABI_VERSION}: "
                                      "rebuild with `pip install -e .`")
            _library = library
        return _library


def _declare(library: ctypes.CDLL) -> None:
    c_int, c_void_p, c_char_p = ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p
    library.saa_version.restype = c_char_p
    library.saa_version.argtypes = []
    library.saa_abi_version.restype = c_int
    library.saa_abi_version.argtypes = []
    library.saa_open.restype = c_int
    library.saa_open.argtypes = [c_char_p, c_char_p, c_char_p, ctypes.POINTER(c_void_p)]
    library.saa_infer.restype = c_int
    library.saa_infer.argtypes = [c_void_p, c_void_p, c_int, c_int, c_int, c_int, c_void_p, c_int, c_int, c_void_p,
                                  c_int, ctypes.POINTER(c_int)]
    library.saa_last_error.restype = c_char_p
    library.saa_last_error.argtypes = [c_void_p]
    library.saa_close.restype = c_int
    library.saa_close.argtypes = [c_void_p]
    library.saa_set_thresholds.restype = c_int
    library.saa_set_thresholds.argtypes = [c_void_p, ctypes.c_double, ctypes.c_double]
    library.saa_last_decision.restype = c_int
    library.saa_last_decision.argtypes = [c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(c_int)]
    library.saa_last_exact.restype = c_int
    library.saa_last_exact.argtypes = [c_void_p, ctypes.POINTER(c_int), ctypes.POINTER(c_int), ctypes.POINTER(c_int)]
    library.saa_reset_memory.restype = c_int
    library.saa_reset_memory.argtypes = [c_void_p]
    library.saa_last_mask.restype = c_int
    library.saa_last_mask.argtypes = [c_void_p, c_void_p, c_int, c_int]
    library.saa_save_memory.restype = c_int
    library.saa_save_memory.argtypes = [c_void_p, c_char_p]
    library.saa_open_options_init.restype = None
    library.saa_open_options_init.argtypes = [ctypes.POINTER(OpenOptions)]
    library.saa_open_options_init_sized.restype = None
    library.saa_open_options_init_sized.argtypes = [ctypes.POINTER(OpenOptions), ctypes.c_int32]
    library.saa_open_ex.restype = c_int
    library.saa_open_ex.argtypes = [c_char_p, c_char_p, ctypes.POINTER(OpenOptions), ctypes.POINTER(c_void_p)]


def version() -> str:
    return load_library().saa_version().decode("utf-8", "replace")


def abi_version() -> int:
    return int(load_library().saa_abi_version())


def last_error(handle: int | None = None) -> str:
    return load_library().saa_last_error(handle).decode("utf-8", "replace")


def _check(status: int, handle: int | None) -> None:
    if status != OK:
        raise CapiError(status, last_error(handle))


def config_string(dataset: str | None, category: str | None, config: str | os.PathLike | None) -> str:
    """saa_open's config argument from the keywords Pipeline.open takes."""
    if config is not None:
        if dataset or category:
            raise CapiError(E_CONFIG, "give either config=FILE or dataset= and category=, not both")
        return os.fspath(config)
    if not dataset or not category:
        raise CapiError(E_CONFIG, "a prompt config is needed: dataset= and category=, or config=FILE")
    return f"{dataset}/{category}"


def frame_arguments(image: np.ndarray) -> tuple[np.ndarray, int, int, int, int]:
    """(array to pass, height, width, stride_bytes, channels); no copy for packed uint8 rows."""
    if not isinstance(image, np.ndarray):
        raise CapiError(E_INVALID_ARGUMENT, f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 and image.size:
        try:
            from ..image_io import to_bgr8

            image = to_bgr8(image)  # 16-bit, float, bool: converted as the Python API does
        except ImageError as err:
            raise CapiError(E_IMAGE, str(err)) from None
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        channels = 1
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        channels = image.shape[2]
    else:
        raise CapiError(E_INVALID_ARGUMENT, f"image shape {image.shape}: expected HxW, HxWx1, HxWx3 or HxWx4")
    height, width = image.shape[:2]
    packed = image.strides[-1] == 1 and (channels == 1 or image.strides[1] == channels)
    if not packed or image.strides[0] < width * channels or image.strides[0] >= 2**31:
        image = np.ascontiguousarray(image)  # flipped, strided or column-sliced arrays
    return image, height, width, int(image.strides[0]) if height else width * channels, channels


class CPipeline:
    """A pipeline opened through the C ABI (one saa_pipeline handle)."""

    def __init__(self, handle: int) -> None:
        self._library = load_library()
        self._handle: int | None = handle
        self._last_map_shape: tuple[int, int] = (0, 0)  # of the last successful call (last_mask's default)
        self._finalizer = weakref.finalize(self, self._library.saa_close, handle)

    @classmethod
    def open(cls, engine_dir: str | os.PathLike, dataset: str | None = None, category: str | None = None,
             config: str | os.PathLike | None = None, device: str = "cpu", threads: int = 0,
             calibration: str | os.PathLike | None = None, memory: str | os.PathLike | None = None,
             stream_memory: int = 0, image_threshold: float | None = None,
             pixel_threshold: float | None = None, warm_up: bool = False, settings: str | None = None) -> "CPipeline":
        """saa_open, or saa_open_ex when a line-side setting, a thread count, a warm-up or engine
        settings ("key=value,...", saa_open_options.settings) are given (the keywords of
        Pipeline.open; stream_memory 0 is off)."""
        library = load_library()
        handle = ctypes.c_void_p()
        text = os.fsencode(config_string(dataset, category, config))
        if not (threads or calibration or memory or stream_memory or warm_up or settings) and image_threshold is None \
                and pixel_threshold is None:
            _check(library.saa_open(os.fsencode(engine_dir), text, device.encode(), ctypes.byref(handle)), None)
            return cls(int(handle.value))
        options = OpenOptions()
        library.saa_open_options_init(ctypes.byref(options))
        options.device, options.threads, options.stream_memory = device.encode(), threads, stream_memory
        options.warm_up = int(warm_up)
        options.calibration = None if calibration is None else os.fsencode(calibration)
        options.memory = None if memory is None else os.fsencode(memory)
        options.settings = None if settings is None else settings.encode()
        if image_threshold is not None:
            options.image_threshold = image_threshold
        if pixel_threshold is not None:
            options.pixel_threshold = pixel_threshold
        _check(library.saa_open_ex(os.fsencode(engine_dir), text, ctypes.byref(options), ctypes.byref(handle)), None)
        return cls(int(handle.value))

    @property
    def handle(self) -> int | None:
        """The raw saa_pipeline pointer (None once closed)."""
        return self._handle

    def __call__(self, image: np.ndarray, out_size: int | tuple[int, int] | None = None,
                 map_out: np.ndarray | None = None, max_regions: int = DEFAULT_MAX_REGIONS) -> CapiResult:
        """Anomaly map (into map_out when given, else a new array) at out_size / map_out's shape /
        the image size, and up to max_regions regions."""
        self._open_handle()
        frame, height, width, stride, channels = frame_arguments(image)
        values = self._map_buffer(map_out, out_size, height, width)
        max_regions = _count(max_regions, "max_regions", MAX_REGIONS)
        regions = np.zeros(max_regions, REGION_DTYPE)
        count = ctypes.c_int(0)
        status = self._library.saa_infer(
            self._handle, frame.ctypes.data, height, width, stride, channels,
            values.ctypes.data, values.shape[0], values.shape[1],
            regions.ctypes.data if max_regions else None, max_regions, ctypes.byref(count))
        _check(status, self._handle)
        self._last_map_shape = values.shape
        return CapiResult(values, [_region(row) for row in regions[:count.value]])

    @staticmethod
    def _map_buffer(map_out: np.ndarray | None, out_size: int | tuple[int, int] | None, height: int,
                    width: int) -> np.ndarray:
        wanted = None
        if out_size is not None:
            wanted = (out_size, out_size) if _is_integer(out_size) else tuple(out_size)
            if len(wanted) != 2 or any(not _is_integer(v) or v < 1 for v in wanted):
                raise CapiError(E_INVALID_ARGUMENT, f"out_size {out_size!r} must be a positive int or (height, width)")
            wanted = (int(wanted[0]), int(wanted[1]))
        if map_out is None:
            return np.empty(wanted or (height, width), np.float32)
        if not isinstance(map_out, np.ndarray) or map_out.dtype != np.float32 or map_out.ndim != 2:
            raise CapiError(E_INVALID_ARGUMENT, "map_out must be a 2-D float32 numpy array")
        if not map_out.flags.c_contiguous or not map_out.flags.writeable:
            raise CapiError(E_INVALID_ARGUMENT, "map_out must be C-contiguous and writeable")
        expected = wanted or (height, width)
        if map_out.shape != tuple(expected):
            what = "out_size" if wanted else "the image size"
            raise CapiError(E_INVALID_ARGUMENT, f"map_out has shape {map_out.shape} but {what} is "
                                                f"{expected[0]}x{expected[1]} (height x width)")
        return map_out

    def _open_handle(self) -> int:
        """The handle; E_CLOSED once close() ran (the library would be handed NULL)."""
        if self._handle is None:
            raise CapiError(E_CLOSED, "this CPipeline was closed")
        return self._handle

    def set_thresholds(self, image: float | None = None, pixel: float | None = None) -> None:
        """Image / pixel thresholds in the map's units (None: off), as Pipeline.set_thresholds."""
        self._open_handle()
        nan = float("nan")
        _check(self._library.saa_set_thresholds(self._handle, nan if image is None else image,
                                                nan if pixel is None else pixel), self._handle)

    def last_decision(self) -> tuple[float, int | None]:
        """(pred_score, pred_label) of the last call; pred_label None without an image threshold."""
        self._open_handle()
        score, label = ctypes.c_float(), ctypes.c_int()
        _check(self._library.saa_last_decision(self._handle, ctypes.byref(score), ctypes.byref(label)), self._handle)
        return float(score.value), None if label.value < 0 else label.value

    def last_exact(self) -> tuple[bool, tuple[int, int] | None]:
        """saa_last_exact: (whether the last frame ran as the reference takes it, else the detector size
        (height, width) whose engines would)."""
        self._open_handle()
        exact, height, width = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        _check(self._library.saa_last_exact(self._handle, ctypes.byref(exact), ctypes.byref(height), ctypes.byref(width)),
               self._handle)
        return bool(exact.value), (None if exact.value else (height.value, width.value))

    def reset_memory(self) -> None:
        _check(self._library.saa_reset_memory(self._open_handle()), self._handle)

    def last_mask(self, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The last call's defect mask (map > pixel threshold) as bool, at the map's size.

        shape: the (height, width) to ask saa_last_mask for (None: the last call's map size);
        a shape other than that map's is refused by the library."""
        self._open_handle()
        if shape is None and self._last_map_shape == (0, 0):
            raise CapiError(E_INVALID_ARGUMENT, "no successful call on this CPipeline yet")
        height, width = self._last_map_shape if shape is None else shape
        if not _is_integer(height) or height < 1 or not _is_integer(width) or width < 1:
            raise CapiError(E_INVALID_ARGUMENT, f"mask shape {shape!r} must be two positive integers")
        mask = np.zeros((height, width), np.uint8)
        _check(self._library.saa_last_mask(self._handle, mask.ctypes.data, height, width), self._handle)
        return mask.astype(bool)

    def save_memory(self, path: str | os.PathLike) -> None:
        """Write the memory (a stream's with what it learned) to `path`, to reopen with memory=path."""
        _check(self._library.saa_save_memory(self._open_handle(), os.fsencode(path)), self._handle)

    def close(self) -> None:
        if self._handle is not None:
            self._finalizer.detach()
            status = self._library.saa_close(self._handle)
            handle, self._handle = self._handle, None
            _check(status, handle)

    def __enter__(self) -> "CPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


MAX_REGIONS = 1 << 20  # regions buffer the binding allocates per call (96 bytes each)


def _is_integer(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _count(value: object, name: str, limit: int) -> int:
    if not _is_integer(value) or not 0 <= value <= limit:
        raise CapiError(E_INVALID_ARGUMENT, f"{name} = {value!r} must be an integer from 0 to {limit}")
    return int(value)


def _region(row: np.void) -> CapiRegion:
    return CapiRegion(tuple(float(v) for v in row["box"]), float(row["score"]), int(row["mask_area"]),
                      int(row["prompt_index"]), bool(row["in_top_k"]), bytes(row["phrase"]).decode("utf-8", "replace"))
