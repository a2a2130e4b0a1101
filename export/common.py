"""What every exporter shares: the ONNX export call, the I/O description, the parity check."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch

from runtime.engine import custom_ops

OPSET = 17  # grid_sample (deformable attention) needs >= 16; LayerNormalization is native from 17


class ExportError(RuntimeError):
    """An export step failed in a way the user can act on (bad checkpoint, parity, ...)."""


class ParityError(ExportError):
    """The ONNX graph disagrees with the PyTorch module beyond the stated tolerance."""


@dataclass
class ExportedModel:
    """One ONNX file and what the manifest says about it (sha256 is added by the writer)."""

    name: str
    file: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    parity: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "parity": self.parity,
            "source": self.source,
        }


def export_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> None:
    """torch -> ONNX with the TorchScript exporter (the dynamo one does not trace these models yet)."""
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dict(dynamic_axes or {}),
            do_constant_folding=True,
        )
    tile_bools_as_int32(path)
    onnx.checker.check_model(str(path))


def pad_right_bottom(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) of [B, H, W, C] tokens, as Concats with zeros: onnxruntime's
    CUDA Pad kernel moved ~10.5 G elements/s on an H200 whatever the size (16.6 ms of SAM ViT-H's
    encoder for its window padding). Used by the SAM and Swin window-padding forms."""
    batch, height, width, channels = x.shape
    zero = x.new_zeros(())  # expanded, so no zero block is stored in the graph
    if pad_w:
        x = torch.cat([x, zero.expand(batch, height, pad_w, channels)], 2)
    if pad_h:
        x = torch.cat([x, zero.expand(batch, pad_h, width + pad_w, channels)], 1)
    return x


def tile_bools_as_int32(path: Path) -> int:
    """Rewrite each Tile of a bool tensor as Cast(int32) -> Tile -> Cast(bool); returns how many.

    onnxruntime's CUDA provider has no bool Tile kernel, so GroundingDINO's attention-mask repeats
    (torch `.repeat` on bool masks: 4 in the head) ran on the CPU, with copies each way, and kept the
    head out of CUDA graph capture ("all compute graph nodes have not been partitioned to the
    CUDAExecutionProvider", H200, onnxruntime-gpu 1.31.1). The result is the same bits.
    """
    model = onnx.load(str(path), load_external_data=False)  # weights untouched: a side file stays valid
    if not any(node.op_type == "Tile" for node in model.graph.node):
        return 0
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.input, *inferred.output)}
    types.update((tensor.name, tensor.data_type) for tensor in inferred.initializer)
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "Tile" or types.get(node.input[0]) != onnx.TensorProto.BOOL:
            nodes.append(node)
            continue
        wide_in, wide_out = f"{node.input[0]}_as_int32", f"{node.output[0]}_as_int32"
        tile = onnx.helper.make_node("Tile", [wide_in, *node.input[1:]], [wide_out], name=node.name)
        nodes += [onnx.helper.make_node("Cast", [node.input[0]], [wide_in], to=onnx.TensorProto.INT32,
                                        name=f"{node.name}_to_int32"),
                  tile,
                  onnx.helper.make_node("Cast", [wide_out], [node.output[0]], to=onnx.TensorProto.BOOL,
                                        name=f"{node.name}_to_bool")]
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save_model(model, str(path))
    return rewritten


_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.UINT8: "uint8",
}


def io_spec(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Names, shapes (str for dynamic axes) and dtypes of a graph's inputs and outputs."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}

    def describe(values) -> list[dict[str, Any]]:
        out = []
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
            out.append({"name": value.name, "shape": shape, "dtype": _ONNX_DTYPES.get(tensor.elem_type, str(tensor.elem_type))})
        return out

    return describe(graph.input), describe(graph.output)


# CPU threads for the export's own work (torch, onnxruntime's parity sessions); 0: every CPU.
_CPU_THREADS = 0


def limit_cpu_threads(threads: int) -> None:
    """Trace and check parity on `threads` CPU threads: exports sharing a machine each took all
    of its cores (two full-size exports side by side on 16 cores: GroundingDINO 260 s each,
    against 120 s alone on 2 cores here)."""
    global _CPU_THREADS
    if threads < 1:
        raise ExportError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    _CPU_THREADS = threads


def cpu_session_options(threads: int = 0) -> ort.SessionOptions:
    """onnxruntime options for the export's CPU sessions: `threads`, else the export's limit,
    and no spinning between runs (parity checks alternate onnxruntime with torch, whose
    threads the spinning workers would starve)."""
    options = ort.SessionOptions()
    if threads or _CPU_THREADS:
        options.intra_op_num_threads = threads or _CPU_THREADS
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    custom_ops.register(options)  # heads traced with --deformable-attention fused use the saa.edge ops
    return options


def ort_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), cpu_session_options(threads), providers=["CPUExecutionProvider"])


def compare_outputs(
    name: str,
    torch_outputs: Sequence[np.ndarray],
    ort_outputs: Sequence[np.ndarray],
    output_names: Sequence[str],
    tolerance: float,
    case: str,
) -> dict[str, Any]:
    """Max abs diff per output for one input case; raise ParityError when over tolerance."""
    diffs = {}
    for out_name, expected, got in zip(output_names, torch_outputs, ort_outputs):
        expected = np.asarray(expected)
        got = np.asarray(got)
        if expected.shape != got.shape:
            raise ParityError(f"{name}: output {out_name} has shape {got.shape} in ONNX, {expected.shape} in PyTorch ({case})")
        if expected.dtype == bool or got.dtype == bool:
            diff = float(np.mean(expected != got))
        else:
            finite = np.isfinite(expected) & np.isfinite(got)
            if not np.array_equal(np.isfinite(expected), np.isfinite(got)):
                raise ParityError(f"{name}: output {out_name} has non-finite values in different places ({case})")
            diff = float(np.max(np.abs(expected[finite].astype(np.float64) - got[finite]))) if finite.any() else 0.0
        diffs[out_name] = diff
    worst = max(diffs.values()) if diffs else 0.0
    if worst > tolerance:
        raise ParityError(f"{name}: ONNX differs from PyTorch by {worst:.3g} > tolerance {tolerance:g} ({case}): {diffs}")
    return {"case": case, "max_abs_diff": worst, "per_output": diffs}


def parity_record(cases: list[dict[str, Any]], tolerance: float, provider: str = "CPUExecutionProvider") -> dict[str, Any]:
    return {
        "max_abs_diff": max((c["max_abs_diff"] for c in cases), default=0.0),
        "tolerance": tolerance,
        "provider": provider,
        "cases": cases,
        "passed": True,
    }
