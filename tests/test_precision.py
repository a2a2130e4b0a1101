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

from export import precision

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
    record = precision.convert_to_fp16(path)
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
    parity = precision.fp16_parity([[before]], path, [{"x": x}])
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
    record = precision.convert_to_fp16(path)
    assert record["nodes_folded"] == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]
    (after,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert 0 < np.abs(before - after).max() < 1e-2


def shared_constant_graph(path: Path) -> None:
    """x -> LayerNormalization(scale, bias) twice, both with the same scale and bias: one fp32-kept
    op type fed by one constant from two places (what constant folding makes of equal weights)."""
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [8], np.full(8, 0.5, np.float32))
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [8], np.zeros(8, np.float32))
    weight = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.eye(8, dtype=np.float32).ravel())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "scale", "bias"], ["a"], axis=-1),
             helper.make_node("LayerNormalization", ["a", "scale", "bias"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [weight, scale, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_fp16_conversion_shares_the_casts_onnxruntime_1_31_repeated(tmp_path, monkeypatch):
    """onnxruntime-gpu 1.31's converter wrote one Cast per consumer of a shared fp16 constant, all
    with one name and one output, and onnxruntime refused the graph: every full-size fp16 export
    on the GPU machine failed to open. The converter's 1.31 output is replayed here (each Cast
    written twice) whichever onnxruntime runs the test."""
    from onnxruntime.transformers import float16

    real = float16.convert_float_to_float16

    def as_in_1_31(model, **kwargs):
        converted = real(model, **kwargs)
        casts = [n for n in converted.graph.node if n.op_type == "Cast"]
        converted.graph.node.extend(copy for copy in (onnx.NodeProto() for _ in casts))
        for copy, cast in zip(converted.graph.node[-len(casts):], casts):
            copy.CopyFrom(cast)
        return converted

    monkeypatch.setattr(float16, "convert_float_to_float16", as_in_1_31)
    path = tmp_path / "g.onnx"
    shared_constant_graph(path)
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    (before,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    precision.convert_to_fp16(path)
    model = onnx.load(str(path))
    names = [n.name for n in model.graph.node if n.name]
    outputs = [o for n in model.graph.node for o in n.output]
    assert any(n.op_type == "Cast" for n in model.graph.node)
    assert len(names) == len(set(names)) and len(outputs) == len(set(outputs))
    (after,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(after, before, atol=1e-2)


def test_repeated_node_names_get_suffixes_and_conflicting_outputs_are_refused():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="n"), helper.make_node("Neg", ["a"], ["b"], name="n")]
    graph = helper.make_graph(nodes, "g", [], [])
    assert precision._merge_repeated_nodes(graph) == 0 and [n.name for n in graph.node] == ["n", "n_1"]
    clash = helper.make_graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["a"])], "g", [], [])
    with pytest.raises(common.ExportError, match="defines 'a' twice"):
        precision._merge_repeated_nodes(clash)


def test_fp16_decoder_opens_with_its_box_count_fixed(full_tiny_engine_dir, tmp_path):
    """GPU pipelines open SAM's decoder with num_boxes fixed (Segmenter.fix_box_count). Folded
    by onnxruntime and saved, the graph was refused then until its constants were renamed."""
    path = tmp_path / "sam_decoder.onnx"
    shutil.copy(full_tiny_engine_dir / "sam_decoder.onnx", path)
    record = precision.convert_to_fp16(path)
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
    assert precision.fp16_provider() == "CPUExecutionProvider"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert precision.fp16_provider() == "CUDAExecutionProvider"


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


def test_a_full_disk_mid_export_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    import errno

    from export import engine_dir
    from export.__main__ import main

    def disk_full(tmp, _args, _reuse=None):
        (tmp / "saliency.onnx").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "saliency.onnx"))

    monkeypatch.setattr(engine_dir, "_export_into", disk_full)
    out = tmp_path / "engines"
    assert main(["--profile", "lite", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "saliency.onnx: No space left on device" in err and "nothing was installed" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the engines dir nor the partial temporary one


def test_lite_refuses_files_only_the_full_profile_uses(tmp_path, capsys):
    pytest.importorskip("torch")
    from export.__main__ import main

    out = tmp_path / "engines"
    assert main(["--profile", "lite", "--tokenizer-zip", "tok.zip", "--sam-checkpoint", "sam.pth", "--out", str(out)]) == 2
    assert "--sam-checkpoint, --tokenizer-zip: only the full profile uses them" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flags, named", [
    (["--random-init"], "--random-init"),  # was written into the manifest as random weights, the weights real
    (["--tiny"], "--tiny"),  # was written as size "tiny" over a full-size CNN
    (["--detector-size", "320x320", "--sam-variant", "vit_b"], "--sam-variant, --detector-size"),
    (["--deformable-attention", "standard"], "--deformable-attention"),
    (["--saliency-backbone", "wide_resnet50_2"], "--saliency-backbone wide_resnet50_2"),
])
def test_lite_refuses_flags_it_would_ignore(tmp_path, capsys, flags, named):
    pytest.importorskip("torch")
    from export.__main__ import main

    out = tmp_path / "engines"
    assert main(["--profile", "lite", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"export failed: {named}") and "lite" in err and "Traceback" not in err
    assert not out.exists()


def test_the_full_defaults_fill_only_unset_flags():
    from argparse import Namespace

    from export.engine_dir import apply_full_defaults, check_profile_flags

    args = Namespace(profile="full", sam_variant=None, sam_attention="mha", detector_size=None, random_init=True)
    check_profile_flags(args)  # the full profile takes them all
    apply_full_defaults(args)
    assert (args.sam_variant, args.sam_attention, args.detector_size) == ("vit_h", "mha", (800, 800))
    lite = Namespace(profile="lite", saliency_backbone="efficientnet_lite0", random_init=False, tiny=False)
    check_profile_flags(lite)  # naming lite's own backbone is fine


@pytest.mark.parametrize("error, kept", [
    (ort.capi.onnxruntime_pybind11_state.NotImplemented("Could not find an implementation for Mul(14)"), True),
    (ort.capi.onnxruntime_pybind11_state.Fail("Load model failed: two nodes with same node name (c)"), False),
])
def test_an_fp16_graph_that_does_not_open_fails_the_export(tmp_path, monkeypatch, error, kept):
    """A missing CPU fp16 kernel is recorded (the graph still runs on a GPU); any other failure to
    open stops the export. It was recorded too, and a manifest listed unloadable engines."""
    small_graph(tmp_path / "g.onnx")
    model = common.ExportedModel("saliency", "g.onnx", [], [], {})
    monkeypatch.setattr(precision, "precision_feeds", lambda *_: {})

    def refuse(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(precision, "fp16_parity", refuse)
    if kept:
        precision.convert_engines_fp16(tmp_path, [model])
        assert model.parity["fp16_vs_fp32"]["measured"] is False
    else:
        with pytest.raises(common.ExportError, match="g.onnx: the fp16 graph does not open.*two nodes"):
            precision.convert_engines_fp16(tmp_path, [model])


def test_bool_tiles_become_int32_tiles_with_the_same_result(tmp_path):
    """onnxruntime's CUDA provider has no bool Tile: such nodes ran on the CPU and kept
    GroundingDINO's head out of CUDA graph capture. The rewrite tiles int32 between two Casts."""
    nodes = [helper.make_node("Greater", ["x", "zero"], ["mask"]),
             helper.make_node("Tile", ["mask", "repeats"], ["tiled"], name="t"),
             helper.make_node("Tile", ["x", "repeats"], ["x_tiled"])]  # float: left alone
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("tiled", TensorProto.BOOL, [4, 9]),
         helper.make_tensor_value_info("x_tiled", TensorProto.FLOAT, [4, 9])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("repeats", TensorProto.INT64, [2], [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert common.tile_bools_as_int32(path) == 1
    rewritten = onnx.load(str(path))
    onnx.checker.check_model(rewritten)
    assert [n.op_type for n in rewritten.graph.node] == ["Greater", "Cast", "Tile", "Cast", "Tile"]
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert common.tile_bools_as_int32(path) == 0  # nothing left to rewrite


def test_exported_detector_head_tiles_no_bool_tensor(full_tiny_engine_dir):
    """The head's attention-mask repeats (4 bool Tiles in GroundingDINO) come out of export as int32."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(full_tiny_engine_dir / "gdino_head.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    tiles = [n for n in model.graph.node if n.op_type == "Tile"]
    assert tiles and all(types.get(n.input[0]) == TensorProto.INT32 for n in tiles)


def test_fp16_head_check_measures_a_copy_and_leaves_the_engines_alone(full_tiny_engine_dir, lite_engine_dir, tmp_path,
                                                                      capsys):
    from bench.experiments import fp16_head

    head = full_tiny_engine_dir / "gdino_head.onnx"
    before = head.read_bytes()
    out = tmp_path / "r.json"
    assert fp16_head.main(["--engine-dir", str(full_tiny_engine_dir), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert head.read_bytes() == before
    assert record["conversion"]["precision"] == "fp16" and "TopK" in record["conversion"]["ops_kept_fp32"]
    case = record["fp16_vs_fp32"]["cases"][0]
    assert case["max_abs_diff"] > 0 and "index_mismatch" in case  # random tiny weights: the selection moves
    with pytest.raises(SystemExit):
        fp16_head.main(["--engine-dir", str(lite_engine_dir)])
    assert "holds lite engines: a `full` profile engine dir is needed" in capsys.readouterr().err


def test_fp16_head_engines_are_a_complete_labelled_engines_dir(full_tiny_engine_dir, tmp_path, capsys):
    from bench.experiments import fp16_head
    from bench.latency import _default_notes
    from runtime.image_io import read_image
    from runtime.manifest import load_manifest
    from runtime.pipeline import Pipeline

    out = tmp_path / "head16"
    assert fp16_head.main(["--engine-dir", str(full_tiny_engine_dir), "--write-engines", str(out)]) == 0
    manifest = load_manifest(out)  # every sha256 checked
    original = load_manifest(full_tiny_engine_dir, verify_hashes=False)
    assert manifest.data["precision"] == original.data.get("precision", "fp32") + "-head-fp16"
    assert manifest.data["variant"] == fp16_head.HEAD_VARIANT and "variant" not in original.data
    head = manifest.models["gdino_head"]
    assert head["sha256"] != original.models["gdino_head"]["sha256"]
    assert head["parity"]["fp16_vs_fp32"]["max_abs_diff"] > 0
    assert (out / "sam_encoder.onnx").read_bytes() == (full_tiny_engine_dir / "sam_encoder.onnx").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".head16")]  # no staging folder left
    assert out.stat().st_mode & 0o777 == full_tiny_engine_dir.stat().st_mode & 0o777
    pipeline = Pipeline.open(out, dataset="mvtec", category="bottle")
    assert pipeline(read_image(Path(__file__).parent / "data" / "bottle_demo.png")).anomaly_map.shape == (900, 900)
    assert _default_notes(manifest, pipeline)[0] == f"engines variant: {fp16_head.HEAD_VARIANT}"
    # a second write into the same folder, and a variant as the source, are refused with one line
    for source, target in ((full_tiny_engine_dir, out), (out, tmp_path / "again")):
        with pytest.raises(SystemExit):
            fp16_head.main(["--engine-dir", str(source), "--write-engines", str(target)])
    err = capsys.readouterr().err
    assert "already exists: name a new folder" in err and "is already a variant" in err


def test_sam_encoder_runs_layernorm_softmax_and_erf_in_fp16_without_casts(full_tiny_engine_dir, tmp_path):
    from runtime import manifest as mf

    assert set(precision.FP16_NATIVE_MODELS) <= set(mf.PROFILE_MODELS["full"])
    assert "Softmax" in precision.fp32_ops(mf.GDINO_TEXT) and "Softmax" not in precision.fp32_ops(mf.SAM_ENCODER)
    feeds = precision.precision_feeds(full_tiny_engine_dir, [mf.SAM_ENCODER])[mf.SAM_ENCODER]
    expected = precision._run_all(full_tiny_engine_dir / "sam_encoder.onnx", feeds, "CPUExecutionProvider")
    records = {}
    for name, keep in (("islands", precision.FP32_OPS), ("native", precision.fp32_ops(mf.SAM_ENCODER))):
        path = tmp_path / f"{name}.onnx"
        shutil.copy(full_tiny_engine_dir / "sam_encoder.onnx", path)
        records[name] = (precision.convert_to_fp16(path, keep), precision.fp16_parity(expected, path, feeds))
        model = onnx.load(str(path))
        types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
        softmax_inputs = [types.get(n.input[0]) for n in model.graph.node if n.op_type == "Softmax"]
        assert softmax_inputs and set(softmax_inputs) == {TensorProto.FLOAT if name == "islands" else TensorProto.FLOAT16}
    (islands, islands_parity), (native, native_parity) = records["islands"], records["native"]
    assert native["ops_kept_fp32"] == ["Pow", "ReduceMean", "Sqrt"]  # SAM neck's hand-written LayerNorm2d: x^2 in fp32
    assert native["nodes_fp16"] < islands["nodes_fp16"]  # the Casts around every LayerNorm, Softmax and Erf are gone
    assert native_parity["relative"] < max(2 * islands_parity["relative"], 2e-3)
