"""saa.h's constants on the Python side: status codes and the saa_region layout (a test
checks them against the header)."""
from __future__ import annotations

import ctypes

import numpy as np

ABI_VERSION = 4  # SAA_ABI_VERSION

OK = 0
E_INVALID_ARGUMENT = -1
E_BAD_HANDLE = -2
E_CLOSED = -3
E_ENGINES = -4
E_CONFIG = -5
E_IMAGE = -6
E_ENGINE = -7
E_PYTHON = -8
E_INTERNAL = -9

PHRASE_CAPACITY = 64  # SAA_PHRASE_CAPACITY, NUL included
# saa_region, field for field (96 bytes, no padding; saa.c asserts the size).
REGION_DTYPE = np.dtype([
    ("box", "<f4", (4,)),
    ("score", "<f4"),
    ("mask_area", "<i4"),
    ("prompt_index", "<i4"),
    ("in_top_k", "<i4"),
    ("phrase", f"S{PHRASE_CAPACITY}"),
])


class OpenOptions(ctypes.Structure):
    """saa_open_options, field for field (64 bytes on 64-bit; saa.c asserts the size)."""

    _fields_ = [
        ("struct_size", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("device", ctypes.c_char_p),
        ("calibration", ctypes.c_char_p),
        ("memory", ctypes.c_char_p),
        ("stream_memory", ctypes.c_int32),
        ("warm_up", ctypes.c_int32),
        ("image_threshold", ctypes.c_double),
        ("pixel_threshold", ctypes.c_double),
        ("settings", ctypes.c_char_p),
    ]
