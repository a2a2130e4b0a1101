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
CHECK_LEVELS = ((6, 5), (3, 3))  # the built-in graph msda_check's levels (export/builtin_graphs.py)
CHECK_TOLERANCE = 1e-4
_warned_cpu_fallback = False
_gpu_checked: dict[str, float] = {}  # library path -> the largest difference its GPU kernel showed


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
    return f"{describe_library(library)} ({library})"


def check_feeds(seed: int = 0) -> dict[str, Any]:
    """Inputs for the msda_check graph: 2 images, 50 queries, 4 heads of 32 channels, 4 points, some
    samples off their level."""
    import numpy as np

    rng = np.random.default_rng(seed)
    positions = sum(h * w for h, w in CHECK_LEVELS)
    return {"value": rng.standard_normal((2, positions, 4, 32), dtype=np.float32),
            "grids": rng.uniform(-1.1, 1.1, (2, 50, 4, len(CHECK_LEVELS), 4, 2)).astype(np.float32),
            "weights": rng.random((2, 50, 4, len(CHECK_LEVELS), 4), dtype=np.float32)}


def _builds_cuda(library: Path) -> bool:
    return "CUDA" in describe_library(library)


def describe_library(library: Path) -> str:
    """The build info a library reports (SaaOpsBuildInfo), or why it cannot be read."""
    try:
        info = ctypes.CDLL(str(library)).SaaOpsBuildInfo
        info.restype = ctypes.c_char_p
        return info().decode()
    except (OSError, AttributeError) as err:
        return f"cannot be read ({err})"


def check_gpu_kernel(device: str) -> float | None:
    """Before a fused head runs on a GPU: the op's CUDA kernel against its CPU kernel on the built-in
    msda_check graph, once per process and library. Returns the largest difference (None where no
    CUDA kernel is in use); EngineError when they disagree, so a wrong kernel never gives silent
    wrong maps. Until the kernel has run on GPUs, this is the guard (its tests ran on a CPU only)."""
    import numpy as np
    import onnxruntime as ort

    from ..engine.sessions import builtin_graph, providers_for

    library = library_for(device)
    if device not in GPU_DEVICES or library is None or not _builds_cuda(library):
        return None
    key = str(library)
    if key not in _gpu_checked:
        graph, feeds = builtin_graph("msda_check"), check_feeds()
        outputs = []
        for providers in (providers_for("cuda"), ["CPUExecutionProvider"]):
            options = ort.SessionOptions()
            options.register_custom_ops_library(key)
            outputs.append(ort.InferenceSession(graph, options, providers=providers).run(["out"], feeds)[0])
        _gpu_checked[key] = float(np.abs(outputs[0] - outputs[1]).max())
    difference = _gpu_checked[key]
    if not difference <= CHECK_TOLERANCE:
        raise EngineError(f"{DEFORMABLE_OP}: the CUDA kernel in {library} disagrees with its CPU kernel by {difference:.3g} "
                          f"(tolerance {CHECK_TOLERANCE}). Run it on the CPU with SAA_OPS_LIBRARY={CPU_LIBRARY}, or export "
                          "with --deformable-attention standard, and report this")
    return difference
