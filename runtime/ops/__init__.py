"""The runtime's onnxruntime custom ops (domain `saa.edge`): their C++/CUDA sources, the build,
and the names both sides share.

One op so far: `MultiScaleDeformableAttention` (msda.h), GroundingDINO's deformable sampling
and weighted sum in one pass, used by heads exported with `--deformable-attention fused`.
`pip install` builds the CPU library (libsaa_ops.so) with the system C++ compiler, and
libsaa_ops_cuda.so (CPU + CUDA kernels) where nvcc is found; `python -m runtime.ops.build [--cuda]`
rebuilds them. runtime.engine.custom_ops registers them with onnxruntime sessions.
"""
from __future__ import annotations

from pathlib import Path

DOMAIN = "saa.edge"
DEFORMABLE_OP = f"{DOMAIN}::MultiScaleDeformableAttention"
HERE = Path(__file__).resolve().parent
CPU_LIBRARY = HERE / "libsaa_ops.so"
CUDA_LIBRARY = HERE / "libsaa_ops_cuda.so"
CHECK_LEVELS = ((6, 5), (3, 3))  # the built-in graph msda_check's levels (export/builtin_graphs.py)
