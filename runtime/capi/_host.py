"""The Python half of the C ABI: libsaa.so calls these with plain integers and addresses.

Nothing here may raise into C: every entry point returns (status, payload), payload being
the result on SAA_OK and a one-line message otherwise. Status codes mirror saa.h (a test
checks that they agree). The frame is read in place from the caller's memory and the map
and regions are written in place into the caller's buffers: no copy through files and no
allocation handed to the caller.
"""
from __future__ import annotations

import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from ..lineside.calibration import CalibrationError
from ..errors import ConfigError, EngineError, ImageError, ManifestError, SaaError
from ..image_io import MAX_PIXELS
from ..lineside.normal_memory import MemoryFileError
from ..pipeline import Pipeline
from ..stages.regions import Region
from ..settings import DEVICES, EngineSettings
from .abi import (E_CONFIG, E_ENGINE, E_ENGINES, E_IMAGE, E_INTERNAL, E_INVALID_ARGUMENT, OK, PHRASE_CAPACITY,
                  REGION_DTYPE)

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")

# Calibration and memory files are settings the line gives: refused ones are configuration errors.
_STATUS_OF = ((ManifestError, E_ENGINES), (ConfigError, E_CONFIG), (CalibrationError, E_CONFIG),
              (MemoryFileError, E_CONFIG), (ImageError, E_IMAGE), (EngineError, E_ENGINE))


class _Memory:
    """Exposes a foreign buffer to numpy without copying (and without ctypes array types,
    whose per-length cache would grow with every new frame size)."""

    def __init__(self, address: int, shape: tuple[int, ...], strides: tuple[int, ...] | None, typestr: str,
                 writable: bool) -> None:
        self.__array_interface__ = {"version": 3, "data": (address, not writable), "shape": shape,
                                    "strides": strides, "typestr": typestr}


def frame_view(address: int, height: int, width: int, stride: int, channels: int) -> np.ndarray:
    """The caller's frame as a read-only uint8 array (HxW or HxWxC), rows `stride` bytes apart."""
    if channels == 1:
        return np.asarray(_Memory(address, (height, width), (stride, 1), "|u1", writable=False))
    return np.asarray(_Memory(address, (height, width, channels), (stride, channels, 1), "|u1", writable=False))


def abi_order(regions: list[Region]) -> list[Region]:
    """saa.h's region order: fused (in_top_k) first, then the rest; each by score descending."""
    return sorted(regions, key=lambda r: (not r.in_top_k, -r.score))


def phrase_bytes(phrase: str) -> bytes:
    """UTF-8, cut to fit SAA_PHRASE_CAPACITY with its NUL, never in the middle of a character."""
    return phrase.encode("utf-8")[:PHRASE_CAPACITY - 1].decode("utf-8", "ignore").encode("utf-8")


def fill_regions(regions: list[Region], out: np.ndarray) -> int:
    """Write the first len(out) regions in ABI order into a REGION_DTYPE array; return the count."""
    ordered = abi_order(regions)[:len(out)]
    for row, region in zip(out, ordered):
        row["box"] = region.box
        row["score"] = region.score
        row["mask_area"] = min(int(region.mask_area), 2**31 - 1)
        row["prompt_index"] = region.prompt_index
        row["in_top_k"] = int(bool(region.in_top_k))
        row["phrase"] = phrase_bytes(region.phrase)
    return len(ordered)


def parse_config(text: str) -> dict[str, Any]:
    """saa_open's config string as Pipeline.open keywords: a prompt file or DATASET/CATEGORY."""
    path = Path(text)
    if path.is_file() or path.suffix.lower() in CONFIG_SUFFIXES:
        return {"config": path}
    parts = text.split("/")
    if len(parts) == 2 and all(p.strip() for p in parts):
        return {"dataset": parts[0].strip(), "category": parts[1].strip()}
    raise ConfigError(f"config {text!r} is neither a prompt file (no such file) "
                      "nor DATASET/CATEGORY such as mvtec/bottle")


def open_pipeline(engine_dir: bytes, config: bytes, device: bytes, threads: int = 0, calibration: bytes | None = None,
                  memory: bytes | None = None, stream_memory: int = 0, image_threshold: float = math.nan,
                  pixel_threshold: float = math.nan, warm_up: int = 0, settings: bytes | None = None) -> tuple[int, Any]:
    """saa_open / saa_open_ex (saa.c checked the pointers and the signs): None and NaN mean unset.
    settings: saa_open_options.settings, "key=value,..." (EngineSettings.parse)."""
    try:
        device_name = device.decode("utf-8", "replace")
        if device_name not in DEVICES:
            return E_INVALID_ARGUMENT, f"device {device_name!r} (expected one of {', '.join(DEVICES)})"
        keywords = parse_config(os.fsdecode(config))
        engine = EngineSettings.parse(settings.decode("utf-8", "replace") if settings else "", device=device_name,
                                      threads=threads)
        return OK, Pipeline.open(
            os.fsdecode(engine_dir), settings=engine,
            calibration=None if calibration is None else os.fsdecode(calibration),
            memory=None if memory is None else os.fsdecode(memory), stream_memory=stream_memory or None,
            image_threshold=None if math.isnan(image_threshold) else image_threshold,
            pixel_threshold=None if math.isnan(pixel_threshold) else pixel_threshold, warm_up=bool(warm_up),
            **keywords)
    except BaseException as err:  # noqa: BLE001 - nothing may unwind into C
        return failure(err)


def infer(pipeline: Pipeline, pixels: int, height: int, width: int, stride: int, channels: int, map_address: int,
          map_height: int, map_width: int, regions_address: int, max_regions: int) -> tuple[int, Any]:
    """Arguments were checked by saa.c (sizes positive, stride >= row, pointers non-NULL)."""
    try:
        if map_height * map_width > MAX_PIXELS:  # the image has the same limit (image_io)
            return E_INVALID_ARGUMENT, (f"map size {map_height} x {map_width} is over {MAX_PIXELS // 1_000_000} "
                                        "megapixels")
        image = frame_view(pixels, height, width, stride, channels)
        same_size = (map_height, map_width) == (height, width)
        result = pipeline(image, out_size=None if same_size else (map_height, map_width))
        values = result.anomaly_map
        if values.shape != (map_height, map_width):
            return E_INTERNAL, f"pipeline returned a {values.shape} map for a {map_height}x{map_width} request"
        np.asarray(_Memory(map_address, (map_height, map_width), None, "<f4", writable=True))[...] = values
        # for saa_last_decision and saa_last_mask
        pipeline._capi_decision = (result.pred_score, result.pred_label, result.pred_mask, (height, width),
                                   result.exact, result.exact_detector_hw)
        if max_regions == 0:
            return OK, 0
        out = np.asarray(_Memory(regions_address, (max_regions * REGION_DTYPE.itemsize,), None, "|u1", writable=True))
        return OK, fill_regions(result.regions, out.view(REGION_DTYPE))
    except BaseException as err:  # noqa: BLE001
        return failure(err)


def control(pipeline: Pipeline, command: str, a: float, b: float, out_address: int,
            text: bytes | None = None) -> tuple[int, Any]:
    """saa_set_thresholds / saa_last_decision / saa_reset_memory / saa_last_mask / saa_save_memory /
    saa_last_exact (arguments checked by saa.c)."""
    try:
        if command == "thresholds":
            try:
                pipeline.set_thresholds(None if math.isnan(a) else a, None if math.isnan(b) else b)
            except ConfigError as err:  # the caller's numbers, not a configuration file
                return E_INVALID_ARGUMENT, _one_line(str(err))
            return OK, 0
        if command == "reset_memory":
            pipeline.reset_memory()
            return OK, 0
        if command == "save_memory":
            if pipeline.memory is None:
                return E_INVALID_ARGUMENT, ("this handle has no memory to save (open it with saa_open_ex and "
                                            "options.memory or options.stream_memory)")
            try:
                pipeline.save_memory(os.fsdecode(text))
            except MemoryFileError as err:  # the path cannot be written: the caller's argument
                return E_INVALID_ARGUMENT, _one_line(str(err))
            return OK, 0
        decision = getattr(pipeline, "_capi_decision", None)
        if command in ("decision", "mask", "exact") and decision is None:
            return E_INVALID_ARGUMENT, "no successful saa_infer on this handle yet"
        if command == "decision":
            score, label = decision[:2]
            np.asarray(_Memory(out_address, (1,), None, "<f4", writable=True))[0] = score
            return OK, -1 if label is None else int(label)
        if command == "exact":
            exact, detector_hw = decision[4:]
            np.asarray(_Memory(out_address, (2,), None, "<i4", writable=True))[...] = detector_hw or (0, 0)
            return OK, int(bool(exact))
        if command == "mask":
            mask, image_size = decision[2:4]
            if mask is None:
                return E_INVALID_ARGUMENT, ("the last saa_infer had no pixel threshold (set one with "
                                            "saa_set_thresholds or a calibration that has one)")
            wanted = image_size if (a, b) == (0, 0) else (int(a), int(b))
            if tuple(mask.shape) != wanted:
                return E_INVALID_ARGUMENT, (f"map size {wanted[0]} x {wanted[1]} differs from the last saa_infer's "
                                            f"map, {mask.shape[0]} x {mask.shape[1]} (height x width)")
            np.asarray(_Memory(out_address, mask.shape, None, "|u1", writable=True))[...] = mask
            return OK, 0
        return E_INTERNAL, f"unknown control command {command!r}"
    except BaseException as err:  # noqa: BLE001 - nothing may unwind into C
        return failure(err)


def close_pipeline(pipeline: Pipeline) -> tuple[int, Any]:
    try:
        pipeline.close()
        return OK, 0
    except BaseException as err:  # noqa: BLE001
        return failure(err)


def failure(err: BaseException) -> tuple[int, str]:
    """(status, one-line message) for an exception: the runtime's errors keep their text; anything
    else is a bug, reported with its type and where it was raised."""
    for kind, status in _STATUS_OF:
        if isinstance(err, kind):
            return status, _one_line(str(err))
    if isinstance(err, SaaError):
        return E_INTERNAL, _one_line(str(err))
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return E_INTERNAL, _one_line(f"{type(err).__name__}: {err}{where}")


def _one_line(text: str) -> str:
    # Paths that are not UTF-8 come back from os.fsdecode with surrogates, which C cannot take as UTF-8.
    return " ".join(text.split()).encode("utf-8", "replace").decode("utf-8") or "unknown error"


def describe() -> str:
    """Which interpreter, prefix, site-packages and runtime the library uses (SAA_VERBOSE=1)."""
    import sysconfig

    from .. import __file__ as runtime_init

    return (f"Python {sys.version.split()[0]} at {sys.executable}; sys.prefix {sys.prefix}; "
            f"site-packages {sysconfig.get_paths()['purelib']}; runtime from {Path(runtime_init).parent}")
