"""`export --precision fp16` and `--trt`: what is converted, what is recorded, what the runtime gets."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export import common

REPO = Path(__file__).resolve().parent.parent


def small_graph(path: Path) -> None:
    """x [2, 8] -> MatMul(W) -> LayerNormalization -> Softmax -> y: one op to halve, two to keep."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], rng.standard_normal((8, 8)).astype(np.float32).ravel())
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [8], np.ones(8, np.float32))
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [8], np.zeros(8, np.float32))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "scale", "bias"], ["n"], axis=-1),
        helper.make_node("Softmax", ["n"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [weight, scale, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_convert_to_fp16_keeps_io_and_sensitive_ops_fp32(tmp_path):
    path = tmp_path / "g.onnx"
    small_graph(path)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    (before,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    record = common.convert_to_fp16(path)
    assert record == {"precision": "fp16", "ops_kept_fp32": ["LayerNormalization", "Softmax"]}
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # the runtime feeds float32 as before
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    weights = {init.name: init.data_type for init in model.graph.initializer}
    assert weights["w"] == TensorProto.FLOAT16 and weights["scale"] == TensorProto.FLOAT  # LayerNorm's own stay fp32
    assert not (tmp_path / "g.onnx.data").exists()
    (after,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    parity = common.fp16_parity([[before]], path, [{"x": x}])
    assert parity["max_abs_diff"] == pytest.approx(float(np.abs(before - after).max()), abs=1e-7)
    assert 0 < parity["max_abs_diff"] < 1e-2 and parity["provider"] == "CPUExecutionProvider"


def test_fp16_is_compared_on_the_gpu_where_there_is_one(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert common.fp16_provider() == "CPUExecutionProvider"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert common.fp16_provider() == "CUDAExecutionProvider"


@pytest.fixture(scope="module")
def lite_fp16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "engines"
    done = subprocess.run([sys.executable, "-m", "export", "--profile", "lite", "--precision", "fp16", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_fp16_lite_engines_record_their_parity_and_run(lite_fp16, lite_engine_dir):
    manifest = json.loads((lite_fp16 / "manifest.json").read_text())
    assert manifest["precision"] == "fp16"
    entry = manifest["models"]["saliency"]
    assert entry["source"]["precision"] == {"precision": "fp16", "ops_kept_fp32": ["ReduceL2"]}
    measured = entry["parity"]["fp16_vs_fp32"]
    assert 0 < measured["max_abs_diff"] < 5e-3 and measured["cases"]  # unit feature vectors
    assert entry["inputs"][0]["dtype"] == "float32"
    from runtime.pipeline import Pipeline

    image = np.random.default_rng(2).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    maps = []
    for engines in (lite_engine_dir, lite_fp16):
        with Pipeline.open(engines, dataset="mvtec", category="bottle") as pipeline:
            maps.append(pipeline(image).anomaly_map)
    assert np.abs(maps[0] - maps[1]).max() < 5e-3  # distances in [0, 1]


def test_trt_without_tensorrt_fails_before_exporting(tmp_path):
    pytest.importorskip("torch")
    if __import__("importlib").util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    from export.__main__ import main

    out = tmp_path / "engines"
    assert main(["--profile", "lite", "--trt", "--out", str(out)]) == 2
    assert not out.exists()
