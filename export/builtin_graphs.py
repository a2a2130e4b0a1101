"""The runtime's small built-in ONNX graphs, built with the onnx package.

The runtime may not import onnx, so these graphs ship as files in runtime/data/graphs/
(`runtime.engine.sessions.builtin_graph` loads them). This module is their source:

    python -m export.builtin_graphs            # rewrite runtime/data/graphs/*.onnx
    python -m export.builtin_graphs --check    # exit 1 if a file differs from its builder

tests/test_builtin_graphs.py checks every file against its builder. The bytes are pinned
(ir_version 8, opset 17, fixed producer), so a rebuild with another onnx gives the same files.
Graphs:
  gemm_transposed     y = a @ b.T (the CPU kNN's products, runtime/stages/saliency_kernels.py)
  knn_distance_mean   the one-object kNN saliency on a GPU (runtime/stages/saliency_kernels.py)
  mask_upscale        SAM's postprocess_masks + threshold for all boxes at once (runtime/stages/mask_graph.py)
  mask_sums           saliency sum and pixel count inside each mask (runtime/stages/mask_fusion.py)
  mask_fuse           top-K fusion of kept masks into the anomaly map (runtime/stages/mask_fusion.py)
  image_canvas_hv     uint8 image -> PIL-exact resize -> normalised, padded float32 canvas,
  image_canvas_vh     horizontal or vertical pass first (runtime/engine/device_canvas.py)
  msda_check          one saa.edge::MultiScaleDeformableAttention node on small fixed levels: the
                      GPU kernel's check against the CPU kernel (runtime/engine/custom_ops.py: check_gpu_kernel)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

GRAPH_DIR = Path(__file__).resolve().parent.parent / "runtime" / "data" / "graphs"
OPSET = 17
IR_VERSION = 8  # pinned: the default follows the onnx version, the bytes must not


def _onnx():
    import onnx
    from onnx import TensorProto, helper

    return onnx, TensorProto, helper


def _ints(name: str, values: list[int]):
    _, TensorProto, helper = _onnx()
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _scalar(name: str, value: float):
    _, TensorProto, helper = _onnx()
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def _model(nodes, name: str, inputs, outputs, initializers=(), custom_domains: tuple[str, ...] = ()) -> bytes:
    onnx, _, helper = _onnx()
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(domain, 1) for domain in custom_domains]
    model = helper.make_model(graph, producer_name="saa-runtime", opset_imports=opsets)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=not custom_domains)  # shape inference knows no custom op
    return model.SerializeToString()


def msda_check() -> bytes:
    """value [B, S, H, d], grids [B, Q, H, L, P, 2], weights [B, Q, H, L, P] -> [B, Q, H*d], the levels
    fixed to runtime.ops.CHECK_LEVELS."""
    from runtime.ops import CHECK_LEVELS, DOMAIN

    _, TensorProto, helper = _onnx()
    node = helper.make_node("MultiScaleDeformableAttention", ["value", "grids", "weights"], ["out"], domain=DOMAIN,
                            spatial_shapes=[size for shape in CHECK_LEVELS for size in shape])
    shapes = {"value": ["batch", "positions", "heads", "channels"],
              "grids": ["batch", "queries", "heads", len(CHECK_LEVELS), "points", 2],
              "weights": ["batch", "queries", "heads", len(CHECK_LEVELS), "points"]}
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in shapes.items()]
    output = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "queries", "features"])
    return _model([node], "msda_check", inputs, [output], custom_domains=(DOMAIN,))


def gemm_transposed() -> bytes:
    """One Gemm node, y = a @ b.T; a [m, k], b [n, k], float32, every size dynamic."""
    _, TensorProto, helper = _onnx()
    return _model(
        [helper.make_node("Gemm", ["a", "b"], ["y"], transB=1)],
        "a_times_b_transposed",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", "k"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", "k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", "n"])],
    )


def knn_distance_mean() -> bytes:
    """keys = sign * F^T F + self_penalty * I; TopK(k, smallest, unsorted); mean of 0.5 * (1 - sign * key).

    features [1, C, H, W] float32, the saliency CNN's output as it is (F: its [C, H*W] view,
    columns L2-normalised; the host passes a [C, P] array as [1, C, P, 1]), k [1] int64, sign [1]
    (+1 farthest, -1 nearest), self_penalty [1] (4 puts the diagonal past every key in [-1, 1],
    so a position never picks itself; 0 keeps it) -> mean_distance [H*W], and feature_sum (the
    sum of F: not finite exactly when a feature is NaN or inf, which the caller refuses).
    """
    _, TensorProto, helper = _onnx()
    nodes = [
        helper.make_node("Flatten", ["features"], ["flat"], axis=2),
        helper.make_node("ReduceSum", ["flat"], ["feature_sum"], keepdims=0),
        helper.make_node("Transpose", ["flat"], ["ft"], perm=[1, 0]),
        helper.make_node("MatMul", ["ft", "flat"], ["sim"]),
        helper.make_node("Mul", ["sim", "sign"], ["keys"]),
        helper.make_node("EyeLike", ["sim"], ["eye"]),
        helper.make_node("Mul", ["eye", "self_penalty"], ["penalty"]),
        helper.make_node("Add", ["keys", "penalty"], ["keys2"]),
        helper.make_node("TopK", ["keys2", "k"], ["chosen", "index"], axis=1, largest=0, sorted=0),
        helper.make_node("Mul", ["chosen", "sign"], ["s"]),
        helper.make_node("Sub", ["one", "s"], ["d1"]),
        helper.make_node("Mul", ["d1", "half"], ["d"]),
        helper.make_node("ReduceMean", ["d"], ["mean_distance"], axes=[1], keepdims=0),
    ]
    inputs = [
        helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, "channels", "height", "width"]),
        helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("sign", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("self_penalty", TensorProto.FLOAT, [1]),
    ]
    outputs = [helper.make_tensor_value_info("mean_distance", TensorProto.FLOAT, ["positions"]),
               helper.make_tensor_value_info("feature_sum", TensorProto.FLOAT, [])]
    return _model(nodes, "knn_distance_mean", inputs, outputs, [_scalar("half", 0.5), _scalar("one", 1.0)])


def mask_upscale(with_logits: bool = False) -> bytes:
    """Sam.postprocess_masks then the threshold, for n masks at once.

    low_res_masks float32 [n, 1, m, m], sizes int64 [5] = (image_size, input_h, input_w,
    height, width), threshold float32 [1] -> masks bool [n, height, width]:
    Resize(linear, half_pixel) to image_size^2, Slice [:input_h, :input_w], Resize(linear,
    half_pixel) to height x width, Squeeze the channel, Greater threshold. Opset-17 Resize has
    no antialias and clamps source coordinates at the edges: each step is
    F.interpolate(bilinear, align_corners=False), as the reference, and cv2.INTER_LINEAR.
    with_logits adds the float logits before the threshold as a second output `logits`
    (tests only: the runtime never brings them to the host).
    """
    _, TensorProto, helper = _onnx()
    linear = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
    nodes = [
        helper.make_node("Shape", ["low_res_masks"], ["batch_channel"], start=0, end=2),  # (n, 1)
        helper.make_node("Slice", ["sizes", "at0", "at1"], ["image_size"]),
        helper.make_node("Slice", ["sizes", "at1", "at3"], ["input_hw"]),
        helper.make_node("Slice", ["sizes", "at3", "at5"], ["original_hw"]),
        helper.make_node("Concat", ["batch_channel", "image_size", "image_size"], ["padded_shape"], axis=0),
        helper.make_node("Concat", ["batch_channel", "original_hw"], ["original_shape"], axis=0),
        helper.make_node("Resize", ["low_res_masks", "", "", "padded_shape"], ["padded"], **linear),
        helper.make_node("Slice", ["padded", "zeros2", "input_hw", "axes_hw"], ["cropped"]),
        helper.make_node("Resize", ["cropped", "", "", "original_shape"], ["upscaled"], **linear),
        helper.make_node("Squeeze", ["upscaled", "axis_channel"], ["logits"]),
        helper.make_node("Greater", ["logits", "threshold"], ["masks"]),
    ]
    constants = [_ints("at0", [0]), _ints("at1", [1]), _ints("at3", [3]), _ints("at5", [5]),
                 _ints("zeros2", [0, 0]), _ints("axes_hw", [2, 3]), _ints("axis_channel", [1])]
    inputs = [
        helper.make_tensor_value_info("low_res_masks", TensorProto.FLOAT, ["n", 1, "m", "m"]),
        helper.make_tensor_value_info("sizes", TensorProto.INT64, [5]),
        helper.make_tensor_value_info("threshold", TensorProto.FLOAT, [1]),
    ]
    outputs = [helper.make_tensor_value_info("masks", TensorProto.BOOL, ["n", "height", "width"])]
    if with_logits:
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", "height", "width"]))
    return _model(nodes, "sam_mask_upscale", inputs, outputs, constants)


def mask_sums() -> bytes:
    """masks bool [n, H, W], saliency float32 [H, W] -> sums [n] (saliency inside each mask)
    and areas [n] (its pixels, as float32: exact below 2^24 pixels), both float32."""
    _, TensorProto, helper = _onnx()
    nodes = [
        helper.make_node("Cast", ["masks"], ["inside"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["inside", "saliency"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "axes_hw"], ["sums"], keepdims=0),
        helper.make_node("ReduceSum", ["inside", "axes_hw"], ["areas"], keepdims=0),
    ]
    inputs = [
        helper.make_tensor_value_info("masks", TensorProto.BOOL, ["n", "height", "width"]),
        helper.make_tensor_value_info("saliency", TensorProto.FLOAT, ["height", "width"]),
    ]
    outputs = [helper.make_tensor_value_info("sums", TensorProto.FLOAT, ["n"]),
               helper.make_tensor_value_info("areas", TensorProto.FLOAT, ["n"])]
    return _model(nodes, "mask_saliency_sums", inputs, outputs, [_ints("axes_hw", [1, 2])])


def mask_fuse() -> bytes:
    """One step of the top-K fusion over one chunk of masks.

    masks bool [n, H, W], keep int64 [k] (indices into this chunk), scores float32 [k],
    total and weight float32 [H, W] (running sums: weight starts at 1 with the +1 rule, else
    0) -> total_out = total + sum of kept masks * score, weight_out = weight + sum of kept
    masks, anomaly = total_out / weight_out where weight_out > 0, else 0.
    """
    _, TensorProto, helper = _onnx()
    nodes = [
        helper.make_node("Gather", ["masks", "keep"], ["kept"], axis=0),
        helper.make_node("Cast", ["kept"], ["inside"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["scores", "axes_hw"], ["score_planes"]),
        helper.make_node("Mul", ["inside", "score_planes"], ["scored"]),
        helper.make_node("ReduceSum", ["scored", "axis_k"], ["added_total"], keepdims=0),
        helper.make_node("ReduceSum", ["inside", "axis_k"], ["added_weight"], keepdims=0),
        helper.make_node("Add", ["total", "added_total"], ["total_out"]),
        helper.make_node("Add", ["weight", "added_weight"], ["weight_out"]),
        helper.make_node("Greater", ["weight_out", "zero"], ["covered"]),
        helper.make_node("Div", ["total_out", "weight_out"], ["ratio"]),  # 0/0 where not covered: Where drops it
        helper.make_node("Where", ["covered", "ratio", "zero"], ["anomaly"]),
    ]
    inputs = [
        helper.make_tensor_value_info("masks", TensorProto.BOOL, ["n", "height", "width"]),
        helper.make_tensor_value_info("keep", TensorProto.INT64, ["k"]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["k"]),
        helper.make_tensor_value_info("total", TensorProto.FLOAT, ["height", "width"]),
        helper.make_tensor_value_info("weight", TensorProto.FLOAT, ["height", "width"]),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["height", "width"])
               for name in ("total_out", "weight_out", "anomaly")]
    return _model(nodes, "top_k_mask_fusion", inputs, outputs,
                  [_ints("axes_hw", [1, 2]), _ints("axis_k", [0]), _scalar("zero", 0.0)])


def image_canvas(vertical_first: bool) -> bytes:
    """A uint8 image to the normalised float32 canvas an image graph takes, on the device.

    image uint8 [h, w, 3]; rows float64 [H', h] and cols_t float64 [w, W']: PIL's 22-bit
    fixed-point bilinear weights as dense matrices (runtime.engine.resize.pil_weight_matrix; the
    identity times 2^22 where a side keeps its size); pads int64 [8] (the canvas's bottom and
    right padding of [1, 3, H', W']); mean, std float32 [1, 3, 1, 1]; divisor float32 [] ->
    canvas float32 [1, 3, Hc, Wc] = pad((resized / divisor - mean) / std).
    Each pass is a float64 matrix product (integer sums stay exact), then PIL's rounding:
    floor((sum + 2^21) / 2^22) clipped to 0..255, so the result is runtime.engine.resize's to the bit.
    Channels go first at once, so both products are plain GEMMs (3 batched, or [3h, w] x [w, W'])."""
    _, TensorProto, helper = _onnx()
    nodes = [
        helper.make_node("Transpose", ["image"], ["chw"], perm=[2, 0, 1]),
        helper.make_node("Cast", ["chw"], ["pixels"], to=TensorProto.DOUBLE),
    ]

    def rounded(source: str, target: str) -> None:  # PIL: (sum + half) >> 22, clipped to 8 bits
        nodes.extend([
            helper.make_node("Add", [source, "half"], [source + "_h"]),
            helper.make_node("Div", [source + "_h", "scale"], [source + "_s"]),
            helper.make_node("Floor", [source + "_s"], [source + "_f"]),
            helper.make_node("Clip", [source + "_f", "low", "high"], [target]),
        ])

    vertical = [helper.make_node("MatMul", ["rows", "{}"], ["v_sum"])]  # [H', h] x [3, h, w] -> [3, H', w]
    horizontal = [helper.make_node("MatMul", ["{}", "cols_t"], ["h_sum"])]  # [3, h, w] x [w, W']
    passes = [("v", vertical), ("h", horizontal)] if vertical_first else [("h", horizontal), ("v", vertical)]
    source = "pixels"
    for name, (node,) in passes:
        node.input[:] = [source if value == "{}" else value for value in node.input]
        nodes.append(node)
        rounded(f"{name}_sum", f"{name}_out")
        source = f"{name}_out"
    nodes += [
        helper.make_node("Cast", [source], ["resized"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["resized", "axis0"], ["batched"]),
        helper.make_node("Div", ["batched", "divisor"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["normalised"]),
        helper.make_node("Pad", ["normalised", "pads"], ["canvas"], mode="constant"),
    ]
    double = TensorProto.DOUBLE
    inputs = [
        helper.make_tensor_value_info("image", TensorProto.UINT8, ["h", "w", 3]),
        helper.make_tensor_value_info("rows", double, ["out_h", "h"]),
        helper.make_tensor_value_info("cols_t", double, ["w", "out_w"]),
        helper.make_tensor_value_info("pads", TensorProto.INT64, [8]),
        helper.make_tensor_value_info("mean", TensorProto.FLOAT, [1, 3, 1, 1]),
        helper.make_tensor_value_info("std", TensorProto.FLOAT, [1, 3, 1, 1]),
        helper.make_tensor_value_info("divisor", TensorProto.FLOAT, []),
    ]
    outputs = [helper.make_tensor_value_info("canvas", TensorProto.FLOAT, [1, 3, "canvas_h", "canvas_w"])]
    constants = [helper.make_tensor(name, double, [], [value])
                 for name, value in (("half", 2.0 ** 21), ("scale", 2.0 ** 22), ("low", 0.0), ("high", 255.0))]
    name = "image_canvas_vh" if vertical_first else "image_canvas_hv"
    return _model(nodes, name, inputs, outputs, constants + [_ints("axis0", [0])])


BUILDERS: dict[str, Callable[[], bytes]] = {
    "gemm_transposed": gemm_transposed,
    "knn_distance_mean": knn_distance_mean,
    "mask_upscale": mask_upscale,
    "mask_sums": mask_sums,
    "mask_fuse": mask_fuse,
    "image_canvas_hv": lambda: image_canvas(vertical_first=False),
    "image_canvas_vh": lambda: image_canvas(vertical_first=True),
    "msda_check": msda_check,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.builtin_graphs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the files with their builders, write nothing")
    parser.add_argument("--out", type=Path, default=GRAPH_DIR, help=f"folder of the graph files (default {GRAPH_DIR})")
    args = parser.parse_args(argv)
    stale = []
    for name, build in BUILDERS.items():
        path = args.out / f"{name}.onnx"
        data = build()
        if path.is_file() and path.read_bytes() == data:
            continue
        if args.check:
            stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path} ({len(data)} bytes)")
    if stale:
        print(f"differ from their builders: {', '.join(stale)} (run python -m export.builtin_graphs)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
