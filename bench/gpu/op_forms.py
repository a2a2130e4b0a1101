"""A/B timing of the alternative forms a graph can be exported in, one full-size layer at a time.

    python -m bench.gpu.op_forms --device cuda --out op_forms.json        (seconds on a GPU)
    python -m bench.gpu.op_forms --device cpu --captions 1 --iters 3       (a CPU)
    python -m bench.gpu.op_forms --device cpu --small --case deformable_sum (small layers: a rehearsal)

Each case exports one layer in each of its forms to ONNX (torch, so this runs where export
runs), checks the forms agree, and times them with the runtime's own session settings
(`runtime.engine.sessions`: the CUDA provider with TF32 off, fixed buffers, a CUDA graph where it
captures). Per form: p50, the CUDA-graph status ("captured" or onnxruntime's reason) and the
largest difference from the case's first form. `python -m bench.gpu` runs the deformable and
SAM-attention cases as its first two steps and picks the forms of its later ones from them.
Cases:

- `deformable_sum`: one GroundingDINO encoder layer's deformable attention at Swin-T 800x800
  (13294 queries, 8 heads, 4 levels x 4 points), a batch of `--captions`: the weighted sum of
  the samples `per_point` (the export's standard form), `per_level` (a ReduceSum over 4 points;
  its CUDA kernel held 68.7 ms of the head's 156 on an H200) or `fused` (the runtime's custom op,
  `export --deformable-attention fused`; timed where its library is built: runtime/ops). On a
  GPU also `fused_cpu_kernel`: the same graph with the library's CPU build (what a pipeline
  falls back to when the CUDA kernel is wrong), and the CUDA kernel's difference from it at full
  size; `kernel_check` is the pipeline's own check on its small built-in graph.
- `window_pad`: SAM ViT-H's window partition padding (64 -> 70 positions, 1280 channels,
  fp16 on CUDA) as `pad` (F.pad: onnxruntime's Pad kernel held 16.6 ms of ViT-H's encoder) or
  `concat` (zeros concatenated, the export's form).
- `sam_attention`: one of ViT-B's global-attention blocks (64x64 tokens, 12 heads, relative
  positions; fp16 on CUDA) with `plain` attention (the default export), `mha` (onnxruntime's
  fused MultiHeadAttention, `export --sam-attention mha`; no faster on this CPU) or `augmented`
  (the relative positions folded into QK^T, `export --sam-attention augmented`).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LEVELS = ((100, 100), (50, 50), (25, 25), (13, 13))  # Swin-T features of an 800x800 input


def _deformable_case(captions: int = 5, seed: int = 0, device: str = "cpu",
                     levels: tuple[tuple[int, int], ...] | None = None) -> tuple[dict[str, Callable[[], Any]], dict[str, np.ndarray]]:
    import torch
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoMultiscaleDeformableAttention

    from export import gdino_forms
    from export.gdino import grounding_dino_config

    torch.manual_seed(seed)
    config = grounding_dino_config("swin-t")
    attention = GroundingDinoMultiscaleDeformableAttention(config, num_heads=config.encoder_attention_heads,
                                                           n_points=config.encoder_n_points).eval()
    with torch.no_grad():  # offsets that reach neighbouring cells, as trained ones do
        attention.sampling_offsets.weight.normal_(0, 0.05)
        attention.sampling_offsets.bias.normal_(0, 2)
    levels = tuple(levels or LEVELS)
    shapes = torch.tensor(levels)
    positions = int((shapes[:, 0] * shapes[:, 1]).sum())
    start = torch.cat([torch.zeros(1, dtype=torch.long), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])

    class Layer(torch.nn.Module):
        def __init__(self, form: str) -> None:
            super().__init__()
            self.attention, self.form = attention, form

        def forward(self, hidden: torch.Tensor, mask: torch.Tensor, position: torch.Tensor,
                    references: torch.Tensor) -> torch.Tensor:
            with gdino_forms.trace_forms(self.attention):
                self.attention.WEIGHTED_SUM = self.form
                try:
                    return self.attention(hidden_states=hidden, attention_mask=mask, encoder_hidden_states=hidden,
                                          position_embeddings=position, reference_points=references,
                                          spatial_shapes=shapes, spatial_shapes_list=list(levels),
                                          level_start_index=start)[0]
                finally:
                    del self.attention.WEIGHTED_SUM  # back to the class's default

    rng = np.random.default_rng(seed)
    feeds = {
        "hidden": rng.standard_normal((captions, positions, config.d_model), dtype=np.float32),
        "mask": np.ones((captions, positions), dtype=bool),
        "position": rng.standard_normal((captions, positions, config.d_model), dtype=np.float32),
        "references": rng.random((captions, positions, len(levels), 2), dtype=np.float32),
    }
    forms = ["per_point", "per_level"]
    from runtime.engine import custom_ops

    if custom_ops.library_for(device) is not None:  # the custom op (export --deformable-attention fused)
        forms.append("fused")
    else:
        print("  deformable_sum: no saa.edge op library built (python -m runtime.ops.build [--cuda]): 'fused' not timed")
    return {form: (lambda form=form: Layer(form)) for form in forms}, feeds


def _window_pad_case(captions: int = 1, device: str = "cpu", channels: int = 1280, size: int = 64, window: int = 14) -> tuple[dict[str, Callable[[], Any]], dict[str, np.ndarray]]:
    import torch

    from export.common import pad_right_bottom

    class Layer(torch.nn.Module):
        def __init__(self, form: str) -> None:
            super().__init__()
            self.form = form

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pad = (window - size % window) % window
            if self.form == "pad":
                padded = torch.nn.functional.pad(x, (0, 0, 0, pad, 0, pad))
            else:
                padded = pad_right_bottom(x, pad, pad)
            return padded * 2.0  # a consumer, so the pad is not the graph's output

    feeds = {"x": np.random.default_rng(0).standard_normal((1, size, size, channels), dtype=np.float32)}
    return {form: (lambda form=form: Layer(form)) for form in ("pad", "concat")}, feeds


def _sam_attention_case(captions: int = 1, device: str = "cpu", dim: int = 768, heads: int = 12, size: int = 64) -> tuple[dict[str, Callable[[], Any]], dict[str, np.ndarray]]:
    import torch
    from segment_anything.modeling.image_encoder import Block

    from export import sam_forms
    from export.sam import RANDOM_REL_POS_STD

    torch.manual_seed(0)
    block = Block(dim, heads, use_rel_pos=True, window_size=0, input_size=(size, size)).eval()
    with torch.no_grad():
        for table in (block.attn.rel_pos_h, block.attn.rel_pos_w):
            table.normal_(0.0, RANDOM_REL_POS_STD)

    class Layer(torch.nn.Module):
        def __init__(self, form: str) -> None:
            super().__init__()
            self.block, self.form = block, form

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with sam_forms.sam_attention_form(self.block, self.form):
                return self.block(x)

    feeds = {"x": np.random.default_rng(0).standard_normal((1, size, size, dim), dtype=np.float32)}
    return {form: (lambda form=form: Layer(form)) for form in sam_forms.SAM_ATTENTIONS}, feeds


CASES = {"deformable_sum": _deformable_case, "window_pad": _window_pad_case, "sam_attention": _sam_attention_case}
SMALL_LEVELS = ((8, 8), (4, 4), (2, 2), (1, 1))
SMALL_CASES = {  # the same layers, small (--small: a rehearsal on a CPU, the tests)
    "deformable_sum": lambda captions, device: _deformable_case(captions, device=device, levels=SMALL_LEVELS),
    "window_pad": lambda captions, device: _window_pad_case(channels=16, size=20, window=14),
    "sam_attention": lambda captions, device: _sam_attention_case(dim=32, heads=2, size=8),
}
FP16_CASES = {"window_pad", "sam_attention"}  # converted to fp16 on CUDA, as the SAM encoder is


def _export(module: Any, feeds: dict[str, np.ndarray], path: Path, fp16: bool) -> None:
    import torch

    from export.common import export_onnx
    from export.precision import convert_to_fp16, fp32_ops
    from runtime.manifest import SAM_ENCODER

    args = tuple(torch.from_numpy(value) for value in feeds.values())
    export_onnx(module, args, path, list(feeds), ["out"])
    if fp16:  # the SAM encoder's conversion (LayerNorm, Softmax, Erf in fp16)
        convert_to_fp16(path, keep_ops=fp32_ops(SAM_ENCODER))


def _time(path: Path, feeds: dict[str, np.ndarray], device: str, iters: int,
          ops_library: str | None = None) -> tuple[float, np.ndarray, str | None]:
    """(p50 ms, output, CUDA-graph status: "captured", onnxruntime's reason why not, or None on the CPU)."""
    from runtime.errors import EngineError
    from runtime.engine.runners import DeviceRunner, PlainRunner
    from runtime.engine.sessions import session_factory
    from runtime.settings import EngineSettings

    settings = EngineSettings(device=device, ops_library=ops_library)
    keep = ("out",) if device != "cpu" else ()
    graph = "captured" if device == "cuda" else None
    try:  # as the runtime runs its fixed-shape graphs on CUDA: captured as a CUDA graph
        runner: Any = DeviceRunner(session_factory(settings, cuda_graph=device == "cuda")(path), static=True)
        out = runner.run(["out"], feeds, keep=keep)[0]
    except EngineError as err:  # a graph onnxruntime will not capture runs plainly
        print(f"  {path.stem}: no CUDA graph ({err})", flush=True)
        graph = str(err).splitlines()[0][:300]
        plain = session_factory(settings)(path)
        runner = DeviceRunner(plain) if device != "cpu" else PlainRunner(plain)
        out = runner.run(["out"], feeds, keep=keep)[0]
    for _ in range(2):
        runner.run(["out"], feeds, keep=keep)
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        runner.run(["out"], feeds, keep=keep)
        times.append((time.perf_counter() - begin) * 1e3)
    result = out.numpy() if hasattr(out, "numpy") else out
    return float(np.median(times)), np.asarray(result, dtype=np.float32), graph


CPU_KERNEL_FORM = "fused_cpu_kernel"  # on a GPU: the fused graph with the op library's CPU build
CPU_KERNEL_ITERS = 3  # the op on the CPU between GPU nodes is slow at full size


def kernel_check(device: str) -> dict[str, Any]:
    """The pipeline's own check of the op's CUDA kernel (runtime.engine.sessions.check_gpu_kernel on the
    built-in msda_check graph): the library a GPU session registers, the difference, and the
    fallback note where the pipeline would run the op on the CPU instead."""
    import warnings

    from runtime.engine import custom_ops
    from runtime.engine.sessions import check_gpu_kernel
    from runtime.errors import EngineError
    from runtime.settings import EngineSettings

    record: dict[str, Any] = {"library": custom_ops.describe(device)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the note is recorded below
            settings, record["fallback"] = check_gpu_kernel(EngineSettings(device=device))
    except EngineError as err:
        record.update(fallback=str(err), ops_library=None)
        return record
    chosen = custom_ops.library_for(device)
    found = custom_ops._gpu_checked.get(str(chosen)) if chosen is not None else None
    record.update(checked=found is not None, difference=found if isinstance(found, float) else None,
                  failure=found if isinstance(found, str) else None, tolerance=custom_ops.CHECK_TOLERANCE,
                  ops_library=settings.ops_library)
    return record


def run(device: str, captions: int, iters: int, cases: list[str], small: bool = False) -> dict[str, Any]:
    import onnxruntime as ort

    from runtime.ops import CPU_LIBRARY

    report: dict[str, Any] = {"device": device, "onnxruntime": ort.__version__, "python": platform.python_version(),
                              "captions": captions, "iters": iters, "small": small, "cases": {}}
    makers = SMALL_CASES if small else CASES
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            forms, feeds = makers[case](captions=captions, device=device)
            fp16 = case in FP16_CASES and device != "cpu"
            runs = [(form, make, None, iters) for form, make in forms.items()]
            if case == "deformable_sum" and "fused" in forms and device != "cpu" and CPU_LIBRARY.is_file():
                runs.append((CPU_KERNEL_FORM, forms["fused"], str(CPU_LIBRARY), min(iters, CPU_KERNEL_ITERS)))
            rows: dict[str, Any] = {}
            outputs = {}
            for form, make, library, count in runs:
                path = Path(tmp) / f"{case}-{form}.onnx"
                if not path.is_file():
                    _export(make(), feeds, path, fp16)
                try:
                    ms, outputs[form], graph = _time(path, feeds, device, count, ops_library=library)
                except Exception as err:  # a form that fails to run is a finding, not the end of the A/B
                    rows[form] = {"failed": str(err).splitlines()[0][:300]}
                    print(f"{case:16s} {form:16s} failed: {rows[form]['failed']}", flush=True)
                    continue
                rows[form] = {"p50_ms": round(ms, 3), "cuda_graph": graph}
                print(f"{case:16s} {form:16s} {ms:9.3f} ms", flush=True)
            first = next(iter(outputs.values()), None)
            if first is None:
                report["cases"][case] = {"forms": rows, "precision": "fp16" if fp16 else "fp32"}
                continue
            for form, out in outputs.items():  # each form against the first (the export's default form)
                rows[form]["max_abs_diff"] = float(np.abs(out - first).max()) if out.shape == first.shape else None
            scale = float(np.abs(first).max()) or 1.0
            diffs = [row["max_abs_diff"] for row in rows.values() if row.get("max_abs_diff") is not None]
            record = {"forms": rows, "precision": "fp16" if fp16 else "fp32",
                      "max_abs_diff_between_forms": max(diffs, default=0.0), "output_scale": scale}
            if CPU_KERNEL_FORM in outputs and "fused" in outputs:
                record["cuda_vs_cpu_kernel_max_abs_diff"] = float(np.abs(outputs["fused"] - outputs[CPU_KERNEL_FORM]).max())
            if case == "deformable_sum":
                record["kernel_check"] = kernel_check(device)
            report["cases"][case] = record
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.op_forms", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--captions", type=int, default=5, help="batch of the deformable layer (the bottle config: 5)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: all")
    parser.add_argument("--small", action="store_true",
                        help="small layers instead of full-size ones (a rehearsal of the steps on a CPU)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = run(args.device, args.captions, args.iters, args.case or sorted(CASES), small=args.small)
    try:
        import subprocess
        report["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        report["gpu"] = None
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
