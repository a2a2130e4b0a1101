"""Native TensorRT plans for the ONNX engines (`export --trt`), built where TensorRT is installed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .common import ExportedModel, ExportError


TRT_DIR = "trt"  # native TensorRT plans, beside the ONNX graphs
# Optimisation-profile ranges (min, opt, max) for the graphs' dynamic axes, by axis name.
TRT_PROFILE = {"num_boxes": (1, 32, 128), "prompts": (1, 8, 32), "tokens": (2, 32, 256),
               "height": (64, 256, 1024), "width": (64, 256, 1024)}


def require_tensorrt() -> Any:
    """The `tensorrt` module, or ExportError saying how to get it (checked before any export work)."""
    try:
        import tensorrt
    except ImportError:
        raise ExportError(
            "--trt needs TensorRT's Python package on the machine that will run the engines "
            "(pip install tensorrt, matching its CUDA); TensorRT plans are tied to that GPU and TensorRT version. "
            "Without --trt the ONNX engines run on onnxruntime's TensorRT execution provider (--device tensorrt)"
        ) from None
    return tensorrt


def build_trt_engines(engine_dir: Path, models: Sequence[ExportedModel], fp16: bool) -> dict[str, dict[str, Any]]:
    """Build one TensorRT plan per graph into engine_dir/trt/ (not yet run: no TensorRT build has been tested).

    Returns manifest "files" entries keyed trt_<model> (file, TensorRT version, fp16), hashed by the writer.
    GroundingDINO's grid_sample form is known to miscompile on some TensorRT versions
    (export-notes.md): check detections on the target before trusting gdino_head's plan.
    """
    trt = require_tensorrt()
    engine_dir = Path(engine_dir)
    (engine_dir / TRT_DIR).mkdir(exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    entries: dict[str, dict[str, Any]] = {}
    for model in models:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(engine_dir / model.file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT cannot parse {model.file}: {errors}")
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for spec in model.inputs:
            if all(isinstance(d, int) for d in spec["shape"]):
                continue
            shapes = []
            for which in range(3):
                shape = []
                for dim in spec["shape"]:
                    if isinstance(dim, int):
                        shape.append(dim)
                    elif dim in TRT_PROFILE:
                        shape.append(TRT_PROFILE[dim][which])
                    else:
                        raise ExportError(f"{model.file}: no TensorRT profile range for dynamic axis {dim!r} of {spec['name']}")
                shapes.append(tuple(shape))
            profile.set_shape(spec["name"], *shapes)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ExportError(f"TensorRT failed to build {model.file} (see the TensorRT log above)")
        target = engine_dir / TRT_DIR / (Path(model.file).stem + ".plan")
        target.write_bytes(bytes(plan))
        entries[f"trt_{model.name}"] = {"file": f"{TRT_DIR}/{target.name}", "tensorrt": trt.__version__, "fp16": bool(fp16)}
    return entries
