"""The `saa.edge` custom-op library (runtime/ops) in onnxruntime sessions: which build a device
takes, registering it, what to do when it is missing, and the GPU kernel's check.

    from runtime.engine import custom_ops
    custom_ops.register(session_options, "cuda")     # before onnxruntime.InferenceSession(...)

`library`: EngineSettings.ops_library (SAA_OPS_LIBRARY), a library chosen by path instead of the
built one.
"""
from __future__ import annotations

import ctypes
import warnings
from pathlib import Path
from typing import Any, Callable

from ..errors import EngineError
from ..ops import CHECK_LEVELS, CPU_LIBRARY, CUDA_LIBRARY, DEFORMABLE_OP, DOMAIN

GPU_DEVICES = ("cuda", "tensorrt")
CHECK_TOLERANCE = 1e-4
_warned_cpu_fallback = False
_gpu_checked: dict[str, float | str] = {}  # library path -> the largest difference its GPU kernel showed, or why it failed


def library_for(device: str, library: str | Path | None = None) -> Path | None:
    """The library a session on `device` registers, or None where none is built.

    A GPU device takes the CUDA build; without one it falls back to the CPU build (onnxruntime
    then runs the op on the CPU between GPU nodes: right, but slow, and no CUDA graph), with a
    warning."""
    global _warned_cpu_fallback
    if library:
        if not Path(library).is_file():
            raise EngineError(f"ops_library (SAA_OPS_LIBRARY) {str(library)!r} is not a file")
        return Path(library)
    if device in GPU_DEVICES:
        if CUDA_LIBRARY.is_file():
            return CUDA_LIBRARY
        if CPU_LIBRARY.is_file() and not _warned_cpu_fallback:
            _warned_cpu_fallback = True
            warnings.warn(f"{CUDA_LIBRARY.name} is not built: {DEFORMABLE_OP} nodes will run on the CPU. "
                          "Build it with: python -m runtime.ops.build --cuda (needs nvcc)", stacklevel=2)
    return CPU_LIBRARY if CPU_LIBRARY.is_file() else None


def register(options: Any, device: str = "cpu", library: str | Path | None = None) -> Path | None:
    """Register the `saa.edge` ops with onnxruntime SessionOptions, where a library is built.

    Graphs without these ops are unaffected; a graph that needs them and finds none fails to load,
    and `explain_missing` turns onnxruntime's message into one that says what to build."""
    chosen = library_for(device, library)
    if chosen is not None:
        try:
            options.register_custom_ops_library(str(chosen))
        except Exception as err:  # onnxruntime raises its own private exception types
            raise EngineError(f"cannot load the custom-op library {chosen}: {err}. Rebuild it: "
                              f"python -m runtime.ops.build{' --cuda' if chosen.name == CUDA_LIBRARY.name else ''}") from None
    return chosen


def explain_missing(message: str, device: str = "cpu") -> str | None:
    """What to do when onnxruntime could not load a graph because of a `saa.edge` op, or None."""
    if DOMAIN not in message and "MultiScaleDeformableAttention" not in message:
        return None
    build = "python -m runtime.ops.build" + (" --cuda (needs nvcc)" if device in GPU_DEVICES else "")
    return (f"the engine uses the custom op {DEFORMABLE_OP} (exported with --deformable-attention fused) and "
            f"no library providing it is loaded: build it with {build}, reinstall saa-edge, "
            "or export again with --deformable-attention standard")


def describe(device: str = "cpu", library: str | Path | None = None) -> str:
    """Which library a session on `device` registers, and what it was built with (for results files)."""
    try:
        chosen = library_for(device, library)
    except EngineError as err:
        return str(err)
    if chosen is None:
        return "not built"
    return f"{describe_library(chosen)} ({chosen})"


def describe_library(library: Path) -> str:
    """The build info a library reports (SaaOpsBuildInfo), or why it cannot be read."""
    try:
        info = ctypes.CDLL(str(library)).SaaOpsBuildInfo
        info.restype = ctypes.c_char_p
        return info().decode()
    except (OSError, AttributeError) as err:
        return f"cannot be read ({err})"


def check_feeds(seed: int = 0) -> dict[str, Any]:
    """Inputs for the msda_check graph: 2 images, 50 queries, 4 heads of 32 channels, 4 points, some
    samples off their level."""
    import numpy as np

    rng = np.random.default_rng(seed)
    positions = sum(h * w for h, w in CHECK_LEVELS)
    return {"value": rng.standard_normal((2, positions, 4, 32), dtype=np.float32),
            "grids": rng.uniform(-1.1, 1.1, (2, 50, 4, len(CHECK_LEVELS), 4, 2)).astype(np.float32),
            "weights": rng.random((2, 50, 4, len(CHECK_LEVELS), 4), dtype=np.float32)}


def check_gpu_kernel(device: str, graph: Callable[[], bytes], cuda_providers: Callable[[], list],
                     library: str | Path | None = None) -> float | None:
    """Before a fused head runs on a GPU: the op's CUDA kernel against its CPU kernel on the built-in
    msda_check graph (`graph()`, run with `cuda_providers()`), once per process and library. Returns the
    largest difference (None where no CUDA kernel is in use); EngineError, saying which, when the two
    disagree by more than CHECK_TOLERANCE or the CUDA run fails (the caller then runs the op on the
    CPU instead: runtime.engine.sessions.check_gpu_kernel)."""
    import numpy as np
    import onnxruntime as ort

    chosen = library_for(device, library)
    if device not in GPU_DEVICES or chosen is None or "CUDA" not in describe_library(chosen):
        return None
    key = str(chosen)
    if key not in _gpu_checked:
        feeds, model = check_feeds(), graph()
        outputs = []
        for providers in (cuda_providers(), ["CPUExecutionProvider"]):
            options = ort.SessionOptions()
            options.register_custom_ops_library(key)
            try:
                outputs.append(ort.InferenceSession(model, options, providers=providers).run(["out"], feeds)[0])
            except Exception as err:  # onnxruntime raises its own private exception types
                where = "CUDA" if len(outputs) == 0 else "CPU"
                _gpu_checked[key] = f"its {where} kernel failed on the check graph ({str(err).splitlines()[0][:200]})"
                break
        else:
            _gpu_checked[key] = float(np.abs(outputs[0] - outputs[1]).max())
    found = _gpu_checked[key]
    if isinstance(found, str):
        raise EngineError(f"{DEFORMABLE_OP} in {chosen}: {found}")
    if not found <= CHECK_TOLERANCE:  # NaN too
        raise EngineError(f"{DEFORMABLE_OP}: the CUDA kernel in {chosen} disagrees with its CPU kernel by {found:.3g} "
                          f"(tolerance {CHECK_TOLERANCE})")
    return found
