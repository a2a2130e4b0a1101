"""`export --precision fp16` and `--trt`: what is converted, what is recorded, what the runtime gets."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import common

REPO = Path(__file__).resolve().parent.parent


def small_graph(path: Path) -> None:
    """x [2, 8] -> MatMul(W) -> * (3 / 2) -> LayerNormalization -> Softmax -> y: one op to halve,
    two to keep, and a constant Div that must not reach the fp16 graph (exporters emit such
    index arithmetic; onnxruntime has no CPU fp16 kernel to fold it with)."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], rng.standard_normal((8, 8)).astype(np.float32).ravel())
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [8], np.ones(8, np.float32))
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [8], np.zeros(8, np.float32))
    three, two = (helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("three", 3.0), ("two", 2.0)))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Div", ["three", "two"], ["factor"]),
        helper.make_node("Mul", ["h", "factor"], ["scaled"]),
        helper.make_node("LayerNormalization", ["scaled", "scale", "bias"], ["n"], axis=-1),
        helper.make_node("Softmax", ["n"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              [weight, scale, bias, three, two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_convert_to_fp16_keeps_io_and_sensitive_ops_fp32(tmp_path):
    path = tmp_path / "g.onnx"
    small_graph(path)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    (before,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    record = common.convert_to_fp16(path)
    assert record["ops_kept_fp32"] == ["LayerNormalization", "Softmax"]
    assert record["nodes_exported"] == 5 and record["nodes_folded"] == 4  # the Div became a constant
    model = onnx.load(str(path))
    assert "Div" not in {node.op_type for node in model.graph.node} and record["nodes_fp16"] == len(model.graph.node)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]  # no folded or inferred copy left behind
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # the runtime feeds float32 as before
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    weights = {init.name: init.data_type for init in model.graph.initializer}
    matmul, norm = (next(n for n in model.graph.node if n.op_type == op) for op in ("MatMul", "LayerNormalization"))
    assert weights[matmul.input[1]] == TensorProto.FLOAT16 and weights[norm.input[1]] == TensorProto.FLOAT  # LayerNorm's own stay fp32
    assert not (tmp_path / "g.onnx.data").exists()
    (after,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    parity = common.fp16_parity([[before]], path, [{"x": x}])
    assert parity["max_abs_diff"] == pytest.approx(float(np.abs(before - after).max()), abs=1e-7)
    assert 0 < parity["max_abs_diff"] < 1e-2 and parity["provider"] == "CPUExecutionProvider"


def test_convert_to_fp16_reads_a_graph_with_its_weights_beside_it(tmp_path):
    """Graphs over protobuf's 2 GB (SAM ViT-H's encoder) come with a `<file>.data` side file:
    folding and converting read it, and the fp16 graph, under 2 GB, is one file again."""
    path = tmp_path / "g.onnx"
    small_graph(path)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    (before,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    model = onnx.load(str(path))
    for tensor in model.graph.initializer:  # raw bytes: only those move to a side file
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="g.onnx.data", size_threshold=0)
    assert (tmp_path / "g.onnx.data").is_file()
    record = common.convert_to_fp16(path)
    assert record["nodes_folded"] == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]
    (after,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert 0 < np.abs(before - after).max() < 1e-2


def test_fp16_decoder_opens_with_its_box_count_fixed(full_tiny_engine_dir, tmp_path):
    """GPU pipelines open SAM's decoder with num_boxes fixed (Segmenter.fix_box_count). Folded
    by onnxruntime and saved, the graph was refused then until its constants were renamed."""
    path = tmp_path / "sam_decoder.onnx"
    shutil.copy(full_tiny_engine_dir / "sam_decoder.onnx", path)
    record = common.convert_to_fp16(path)
    assert record["nodes_folded"] < record["nodes_exported"]
    rng = np.random.default_rng(0)
    embedding = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    feeds = {"image_embeddings": rng.standard_normal(embedding).astype(np.float32),
             "boxes": (rng.random((3, 4)) * 1000).astype(np.float32)}
    outputs = []
    for dims in ({}, {"num_boxes": 3}):
        options = ort.SessionOptions()
        for name, size in dims.items():
            options.add_free_dimension_override_by_name(name, size)
        outputs.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds))
    for fixed, dynamic in zip(outputs[1], outputs[0]):
        np.testing.assert_allclose(fixed, dynamic, atol=1e-3)


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
    converted = entry["source"]["precision"]
    assert converted["precision"] == "fp16" and converted["ops_kept_fp32"] == ["ReduceL2"]
    assert converted["nodes_folded"] < converted["nodes_exported"]
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


def test_lite_refuses_files_only_the_full_profile_uses(tmp_path, capsys):
    pytest.importorskip("torch")
    from export.__main__ import main

    out = tmp_path / "engines"
    assert main(["--profile", "lite", "--tokenizer-zip", "tok.zip", "--sam-checkpoint", "sam.pth", "--out", str(out)]) == 2
    assert "--sam-checkpoint, --tokenizer-zip: only the full profile uses them" in capsys.readouterr().err
    assert not out.exists()
