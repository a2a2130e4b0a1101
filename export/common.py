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
    onnx.checker.check_model(str(path))


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


def ort_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
