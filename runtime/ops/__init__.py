"""The runtime's onnxruntime custom ops (domain `saa.edge`), compiled into a shared library.

    from runtime import ops
    ops.register(session_options, "cuda")     # before onnxruntime.InferenceSession(...)

One op so far: `MultiScaleDeformableAttention` (msda.h), GroundingDINO's deformable sampling
and weighted sum in one pass, used by heads exported with `--deformable-attention fused`.
`pip install` builds the CPU library (libsaa_ops.so) with the system C++ compiler;
`python -m runtime.ops.build --cuda` builds libsaa_ops_cuda.so (CPU + CUDA kernels) where nvcc
is installed. SAA_OPS_LIBRARY=<path> picks a library explicitly.
"""
from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import EngineError

DOMAIN = "saa.edge"
DEFORMABLE_OP = f"{DOMAIN}::MultiScaleDeformableAttention"
HERE = Path(__file__).resolve().parent
CPU_LIBRARY = HERE / "libsaa_ops.so"
CUDA_LIBRARY = HERE / "libsaa_ops_cuda.so"
GPU_DEVICES = ("cuda", "tensorrt")
_warned_cpu_fallback = False


def library_for(device: str) -> Path | None:
    """The library a session on `device` registers, or None where none is built.

    A GPU device takes the CUDA build; without one it falls back to the CPU build (onnxruntime
    then runs the op on the CPU between GPU nodes: right, but slow, and no CUDA graph), with a
    warning."""
    global _warned_cpu_fallback
    chosen = os.environ.get("SAA_OPS_LIBRARY")
    if chosen:
        if not Path(chosen).is_file():
            raise EngineError(f"SAA_OPS_LIBRARY={chosen!r} is not a file")
        return Path(chosen)
    if device in GPU_DEVICES:
        if CUDA_LIBRARY.is_file():
            return CUDA_LIBRARY
        if CPU_LIBRARY.is_file() and not _warned_cpu_fallback:
            _warned_cpu_fallback = True
            warnings.warn(f"{CUDA_LIBRARY.name} is not built: {DEFORMABLE_OP} nodes will run on the CPU. "
                          "Build it with: python -m runtime.ops.build --cuda (needs nvcc)", stacklevel=2)
    return CPU_LIBRARY if CPU_LIBRARY.is_file() else None


def register(options: Any, device: str = "cpu") -> Path | None:
    """Register the `saa.edge` ops with onnxruntime SessionOptions, where a library is built.

    Graphs without these ops are unaffected; a graph that needs them and finds none fails to load,
    and `explain_missing` turns onnxruntime's message into one that says what to build."""
    library = library_for(device)
    if library is not None:
        try:
            options.register_custom_ops_library(str(library))
        except Exception as err:  # onnxruntime raises its own private exception types
            raise EngineError(f"cannot load the custom-op library {library}: {err}. Rebuild it: "
                              f"python -m runtime.ops.build{' --cuda' if library.name == CUDA_LIBRARY.name else ''}") from None
    return library


def explain_missing(message: str, device: str = "cpu") -> str | None:
    """What to do when onnxruntime could not load a graph because of a `saa.edge` op, or None."""
    if DOMAIN not in message and "MultiScaleDeformableAttention" not in message:
        return None
    build = "python -m runtime.ops.build" + (" --cuda (needs nvcc)" if device in GPU_DEVICES else "")
    return (f"the engine uses the custom op {DEFORMABLE_OP} (exported with --deformable-attention fused) and "
            f"no library providing it is loaded: build it with {build}, reinstall saa-edge, "
            "or export again with --deformable-attention standard")


def describe(device: str = "cpu") -> str:
    """Which library a session on `device` registers, and what it was built with (for results files)."""
    try:
        library = library_for(device)
    except EngineError as err:
        return str(err)
    if library is None:
        return "not built"
    try:
        info = ctypes.CDLL(str(library)).SaaOpsBuildInfo
        info.restype = ctypes.c_char_p
        return f"{info().decode()} ({library})"
    except (OSError, AttributeError) as err:
        return f"{library}: cannot be read ({err})"
