"""onnxruntime sessions for the engines, on the device the user asked for."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnxruntime as ort

from .errors import EngineError

DEVICES = ("cpu", "cuda")
SessionFactory = Callable[[Path], ort.InferenceSession]


def providers_for(device: str) -> list:
    if device not in DEVICES:
        raise EngineError(f"unknown device {device!r} (expected one of {', '.join(DEVICES)})")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise EngineError(
            "device 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}): install onnxruntime-gpu, or use --device cpu"
        )
    return [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}), "CPUExecutionProvider"]


def session_factory(device: str = "cpu", threads: int = 0) -> SessionFactory:
    """A function making one InferenceSession per engine file with shared settings."""
    providers = providers_for(device)

    def make_session(path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises several private exception types
            raise EngineError(f"{path}: cannot load engine ({str(err).splitlines()[0]})") from None

    return make_session
