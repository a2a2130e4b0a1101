"""fp16 engines: constant folding, the conversion (with the ops kept in fp32), and each converted
graph's parity against its fp32 graph on the exporters' own parity inputs."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .common import ExportedModel, ExportError, cpu_session_options, ort_session


PRECISIONS = ("fp32", "fp16")
# Ops kept in float32 inside fp16 graphs (export-notes.md: LayerNorm overflows in fp16; softmax and
# the deformable-attention grid_sample need fp32 inputs; the manual LayerNorm2d of SAM's neck is
# ReduceMean/Pow/Sqrt; the saliency's L2 normalisation is ReduceL2).
FP32_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "InstanceNormalization", "Softmax", "GridSample",
            "ReduceMean", "ReduceSum", "ReduceL2", "Pow", "Sqrt", "Exp", "Log", "Erf", "TopK", "CumSum", "Range",
            "MultiScaleDeformableAttention")  # the last: the runtime's custom op (runtime/ops) has fp32 kernels only
# onnxruntime's own LayerNormalization, Softmax and Erf kernels take fp16 in and out and accumulate
# in fp32 (CUDA; the CPU provider converts too). In the graphs where most of their traffic is, their
# inputs are fp16 products already, so an fp32 island only adds two Casts and a pass in fp32: SAM
# ViT-B's four global-attention softmaxes move ~4 GB each that way instead of ~0.8 GB, and the Casts
# keep onnxruntime from fusing GELU. Full-size ViT-B encoder, fp16 vs fp32 on the CPU provider:
# relative difference 8.1e-4 -> 9.2e-4, 710 -> 614 nodes; Swin-T image graph (tiny): 1.20e-3 -> 1.28e-3.
# SAM's decoder too: it runs every box over the 4096 image tokens, and on an H200 element-wise
# kernels (its Casts among them) led its 13.3 ms; full-size ViT-B decoder, 32 boxes, CPU provider:
# relative 2.07e-3 -> 1.89e-3, low-res mask signs flipped 0.042% -> 0.044%, 49 -> 13 Casts
# (bench/results/fp16_native_ops_cpu_full-vit-b-decoder_2026-11-26.json).
FP16_NATIVE_OPS = ("LayerNormalization", "Softmax", "Erf")
FP16_NATIVE_MODELS = ("sam_encoder", "gdino_image", "sam_decoder")
# Graphs left wholly in fp32: fp16 GroundingDINO fusion/decoder loses boxes (NVIDIA/TensorRT#3413);
# its backbone in fp16 matched fp32. The head is where the detector's fusion and decoder live.
FP32_MODELS = ("gdino_head",)
_PROTOBUF_LIMIT = 2_000_000_000  # a single .onnx file must stay under protobuf's 2 GB


def fold_constants(path: Path, out: Path) -> dict[str, int]:
    """Write `path` to `out` with onnxruntime's basic graph optimisations applied (constant
    folding, redundant node removal: rewrites in standard ONNX ops that hold on every provider),
    initializers in the side file `<out>.data`. Node counts before and after.

    The exported graphs compute index and shape arithmetic (SAM's relative positions, Swin's
    window masks) from constants; onnxruntime folds that when it opens an fp32 graph, but only
    with CPU kernels, which it lacks for most fp16 arithmetic. Converted first, those nodes ran
    on every call: SAM ViT-B's fp16 encoder kept 1174 nodes after onnxruntime's own basic pass
    (398 of them constant work), where its fp32 encoder folds to 596. Folded before the
    conversion, nothing of it is left to convert.
    """
    options = cpu_session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.log_severity_level = 3  # "cannot constant fold" notes for fp16 nodes: none are fp16 yet
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    folded = onnx.load(str(out), load_external_data=False)  # the weights stay in the side file
    _rename_initializers(folded.graph)
    onnx.save_model(folded, str(out))
    return {"nodes_exported": len(onnx.load(str(path), load_external_data=False).graph.node),
            "nodes_folded": len(folded.graph.node)}


def _rename_initializers(graph: onnx.GraphProto) -> None:
    """Give the initializers of an onnxruntime-optimised graph names of their own. onnxruntime
    refused to open such a graph again with a dimension fixed (the runtime's static shapes):
    folding then made constants under names the first pass had already used ("Attempt to
    replace the existing tensor", onnxruntime 1.32; SAM's decoder)."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return  # subgraphs may name outer constants: leave every name as it is
    names = {tensor.name: f"folded_constant_{index}" for index, tensor in enumerate(graph.initializer)}
    for tensor in graph.initializer:
        tensor.name = names[tensor.name]
    for node in graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        value.name = names.get(value.name, value.name)


def _merge_repeated_nodes(graph: onnx.GraphProto) -> int:
    """Keep one of each set of identical nodes (same op, inputs, outputs, attributes); give any
    other repeated node name a suffix. Returns how many nodes were dropped.

    onnxruntime 1.31's fp16 converter (onnxruntime.transformers.float16) added one Cast per
    consumer when an fp16 constant fed several fp32-kept nodes, all with the same output and node
    name, and onnxruntime then refused the graph ("two nodes with same node name"; found on the
    GPU machine, whose onnxruntime-gpu was 1.31). 1.32 shares one Cast. Constant folding made
    such sharing common: it merges equal constants.
    """
    made: dict[str, tuple] = {}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        key = (node.op_type, node.domain, tuple(node.input), tuple(node.output),
               tuple(a.SerializeToString() for a in node.attribute))
        repeated = [name for name in node.output if name and name in made]
        if repeated and all(made[name] == key for name in node.output if name):
            continue
        if repeated:
            raise ExportError(f"the fp16 graph defines {repeated[0]!r} twice, differently (onnxruntime's "
                              "fp16 converter; export --precision fp32 works meanwhile)")
        made.update((name, key) for name in node.output if name)
        kept.append(node)
    dropped = len(graph.node) - len(kept)
    if dropped:
        del graph.node[:]
        graph.node.extend(kept)
    seen: dict[str, int] = {}
    for node in graph.node:
        if node.name and node.name in seen:
            seen[node.name] += 1
            node.name = f"{node.name}_{seen[node.name]}"
        seen.setdefault(node.name, 0)
    return dropped


def fp32_ops(model_name: str) -> tuple[str, ...]:
    """The ops `model_name`'s fp16 graph keeps in fp32 (FP32_OPS, less FP16_NATIVE_OPS where it runs them in fp16)."""
    if model_name in FP16_NATIVE_MODELS:
        return tuple(op for op in FP32_OPS if op not in FP16_NATIVE_OPS)
    return FP32_OPS


def convert_to_fp16(path: Path, keep_ops: Sequence[str] = FP32_OPS) -> dict[str, Any]:
    """Rewrite the graph at `path` in float16, inputs and outputs left float32 (the runtime is unchanged).

    Constants are folded first (fold_constants). Weights go to fp16 except those feeding
    `keep_ops`; casts are inserted at the boundaries. A `<file>.data` side file is written only
    when the fp16 graph is still over 2 GB.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    path = Path(path)
    side = path.with_name(path.name + ".data")
    folded = path.with_name(path.stem + ".folded.onnx")
    # Shape inference on the file, not in memory: a graph over 2 GB (SAM ViT-H's encoder) cannot
    # be serialised whole, which the converter's own in-memory inference would try.
    inferred = path.with_name(path.stem + ".shapes.onnx")
    try:
        nodes = fold_constants(path, folded)
        onnx.shape_inference.infer_shapes_path(str(folded), str(inferred))
        model = onnx.load(str(inferred), load_external_data=True)  # external data resolves beside them
    finally:
        for temporary in (folded, inferred, folded.with_name(folded.name + ".data")):
            temporary.unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values truncated to fp16 range": the parity record measures the effect
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_ops),
                                             disable_shape_infer=True)
    del model
    _merge_repeated_nodes(converted.graph)
    side.unlink(missing_ok=True)
    if converted.ByteSize() > _PROTOBUF_LIMIT:
        onnx.save_model(converted, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=side.name, size_threshold=1024)
    else:
        onnx.save_model(converted, str(path))
    kept = sorted({node.op_type for node in converted.graph.node if node.op_type in keep_ops})
    return {"precision": "fp16", "ops_kept_fp32": kept, **nodes, "nodes_fp16": len(converted.graph.node)}


def _run_all(path: Path, feeds: Sequence[dict[str, np.ndarray]], provider: str) -> list[list[np.ndarray]]:
    if provider == "CPUExecutionProvider":
        providers: list[Any] = [provider]
    else:  # fp32 islands of an fp16 graph stay fp32 on the GPU too (runtime.engine.sessions does the same)
        providers = [(provider, {"use_tf32": "0"}), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), cpu_session_options(), providers=providers)
    return [session.run(None, case) for case in feeds]


_OrtNotImplemented = ort.capi.onnxruntime_pybind11_state.NotImplemented  # no kernel for an op on this provider


def fp16_provider() -> str:
    """Where fp16 graphs are compared with fp32: onnxruntime's CUDA provider where this
    onnxruntime has it (what an fp16 engine runs on, and faster), else the CPU provider."""
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"


def fp16_parity(fp32_outputs: Sequence[Sequence[np.ndarray]], fp16_path: Path, feeds: Sequence[dict[str, np.ndarray]],
                provider: str = "CPUExecutionProvider") -> dict[str, Any]:
    """How far the fp16 graph is from the fp32 one on the same inputs (recorded, never raised:
    fp16 is opt-in). Per case: max abs difference and the same relative to the largest |fp32| output."""
    cases = []
    for case, expected, got in zip(range(len(feeds)), fp32_outputs, _run_all(fp16_path, feeds, provider)):
        diff = scale = 0.0
        mismatch = 0.0
        for a, b in zip(expected, got):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype.kind in "iub":  # indices (GroundingDINO's query selection): share of entries that differ
                mismatch = max(mismatch, float(np.mean(a != b)))
                continue
            finite = np.isfinite(a) & np.isfinite(b)
            if finite.any():
                diff = max(diff, float(np.max(np.abs(a[finite].astype(np.float64) - b[finite]))))
                scale = max(scale, float(np.max(np.abs(a[finite]))))
        record = {"case": case, "max_abs_diff": diff, "relative": diff / scale if scale else 0.0}
        if mismatch:
            record["index_mismatch"] = mismatch
        cases.append(record)
    return {
        "max_abs_diff": max((c["max_abs_diff"] for c in cases), default=0.0),
        "relative": max((c["relative"] for c in cases), default=0.0),
        "provider": provider,
        "cases": cases,
    }


def precision_feeds(engine_dir: Path, names: Sequence[str]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Inputs to compare fp16 with fp32 on, per model: the exporters' parity inputs, and for the
    graphs fed by another graph (SAM decoder, GroundingDINO head) that graph's fp32 outputs."""
    from runtime import manifest as mf

    engine_dir = Path(engine_dir)
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    if mf.SALIENCY in names:
        from .saliency import parity_image

        feeds[mf.SALIENCY] = [{"image": parity_image(mf.SALIENCY_SINGLE_SIZE, seed=1).numpy()}]
    if mf.SAM_ENCODER in names:
        from .sam import parity_boxes
        from .sam import parity_image as sam_image

        image = sam_image().numpy()
        feeds[mf.SAM_ENCODER] = [{"image": image}]
        (embedding,) = ort_session(engine_dir / f"{mf.SAM_ENCODER}.onnx").run(None, {"image": image})
        feeds[mf.SAM_DECODER] = [{"image_embeddings": embedding, "boxes": parity_boxes(5, seed=11).numpy()}]
    if mf.GDINO_IMAGE in names:
        from runtime.stages.text import TOKENIZER_FILE, GdinoTokenizer

        from . import gdino

        image_session = ort_session(engine_dir / f"{mf.GDINO_IMAGE}.onnx")
        height, width = image_session.get_inputs()[0].shape[2:]
        image = gdino._image_case((int(height), int(width)), seed=1)
        text = gdino._text_case(GdinoTokenizer(engine_dir / TOKENIZER_FILE), ["defect on bottle.", "crack. black hole."])
        feeds[mf.GDINO_IMAGE] = [{n: image[n] for n in gdino.IMAGE_INPUTS}]
        feeds[mf.GDINO_TEXT] = [{n: text[n] for n in gdino.TEXT_INPUTS}]
        vision = image_session.run(None, feeds[mf.GDINO_IMAGE][0])
        (features,) = ort_session(engine_dir / f"{mf.GDINO_TEXT}.onnx").run(None, feeds[mf.GDINO_TEXT][0])
        head = [*vision, features, text["attention_mask"], text["position_ids"], text["text_self_attention_masks"]]
        feeds[mf.GDINO_HEAD] = [dict(zip(gdino.HEAD_INPUTS, head))]
    return {name: cases for name, cases in feeds.items() if name in names}


def convert_engines_fp16(engine_dir: Path, models: Sequence[ExportedModel]) -> None:
    """`export --precision fp16`: convert each exported graph in place, recording in its manifest
    entry what stayed fp32 (source["precision"]) and the fp16-vs-fp32 difference (parity["fp16_vs_fp32"])."""
    engine_dir = Path(engine_dir)
    names = [m.name for m in models]
    feeds = precision_feeds(engine_dir, names)  # before any graph changes: chained inputs come from fp32 graphs
    for model in models:
        path = engine_dir / model.file
        if model.name in FP32_MODELS:
            model.source["precision"] = {"precision": "fp32", "why": "fp16 GroundingDINO fusion/decoder loses boxes"}
            continue
        cases = feeds.get(model.name, [])
        expected = _run_all(path, cases, "CPUExecutionProvider")
        model.source["precision"] = convert_to_fp16(path, fp32_ops(model.name))
        if not path.with_name(path.name + ".data").is_file():
            model.source.pop("external_data", None)  # fp16 halved it under protobuf's 2 GB: one file now
        try:
            model.parity["fp16_vs_fp32"] = fp16_parity(expected, path, cases, fp16_provider())
        except _OrtNotImplemented as err:  # onnxruntime lacks a CPU fp16 kernel: the graph may still run on a GPU
            model.parity["fp16_vs_fp32"] = {"measured": False, "reason": str(err).splitlines()[0][:300]}
        except Exception as err:  # an engine that cannot open must not reach a manifest
            raise ExportError(f"{model.file}: the fp16 graph does not open in onnxruntime {ort.__version__} "
                              f"({str(err).splitlines()[0][:300]}); export --precision fp32 works meanwhile") from None
