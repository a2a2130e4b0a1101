"""Does onnxruntime's CUDA provider run fp32 MatMuls in TF32, and what does that do to the pipeline?

Run on the GPU machine: `python3 -m bench.experiments.tf32_check ENGINE_DIR [IMAGE]` (an fp32 engines dir).
1. One 2048x2048 fp32 MatMul on the CUDA provider with its default options, with use_tf32=0 and
   with use_tf32=1, each against float64 numpy: TF32 keeps 10 mantissa bits (relative error ~1e-3),
   fp32 23 (~1e-6).
2. The pipeline on the engines dir: CUDA with SAA_CUDA_TF32 unset (0 since 2026-11-26; it meant
   onnxruntime's default, TF32 on, when bench/results/tf32_check_cuda-h200_2026-11-26.json was taken),
   0 and 1, each against the CPU provider: regions, saliency and anomaly map differences. Prints one JSON object.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


def _matmul_model() -> bytes:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2048, 2048])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2048, 2048])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2048, 2048])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "mm", [a, b], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10).SerializeToString()


def matmul_errors() -> dict[str, float]:
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2048, 2048)).astype(np.float32) for _ in range(2))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = float(np.abs(exact).max())
    errors = {}
    for label, options in (("default", {}), ("use_tf32=0", {"use_tf32": "0"}), ("use_tf32=1", {"use_tf32": "1"})):
        session = ort.InferenceSession(_matmul_model(), providers=[("CUDAExecutionProvider", options)])
        got = session.run(None, {"a": a, "b": b})[0]
        errors[label] = float(np.abs(got - exact).max() / scale)
    return errors


def pipeline_differences(engine_dir: Path, image_path: Path) -> dict[str, dict]:
    from runtime.image_io import read_image
    from runtime.pipeline import Pipeline

    image = read_image(image_path)
    expected = Pipeline.open(engine_dir, dataset="mvtec", category="bottle")(image)
    out = {}
    for label in ("unset", "0", "1"):
        if label == "unset":
            os.environ.pop("SAA_CUDA_TF32", None)
        else:
            os.environ["SAA_CUDA_TF32"] = label
        got = Pipeline.open(engine_dir, dataset="mvtec", category="bottle", device="cuda")(image)
        peak = float(expected.anomaly_map.max()) or 1.0
        out[label] = {
            "regions": [len(got.regions), len(expected.regions)],
            "max_box_diff": float(np.abs(np.array([r.box for r in got.regions]) - np.array([r.box for r in expected.regions])).max())
            if got.regions and len(got.regions) == len(expected.regions) else None,
            "saliency_max_abs": float(np.abs(got.saliency_map - expected.saliency_map).max()),
            "map_max_abs_rel": float(np.abs(got.anomaly_map - expected.anomaly_map).max() / peak),
            "map_pixels_off_1e-3": float((np.abs(got.anomaly_map - expected.anomaly_map) > 1e-3 * peak).mean()),
        }
    return out


def main(argv: list[str]) -> None:
    ort.preload_dlls()
    report: dict = {"onnxruntime": ort.__version__, "matmul_relative_error": matmul_errors()}
    if argv:
        image = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[2] / "tests/data/bottle_demo.png"
        report["pipeline_vs_cpu"] = pipeline_differences(Path(argv[0]), image)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
