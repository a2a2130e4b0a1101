"""`python -m runtime.infer`: anomaly maps, overlays and region JSON for images or folders.

    python -m runtime.infer --engine-dir engines/ --dataset mtd --category mtd IMAGE_OR_DIR... --out out/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Sequence

from .config import add_config_arguments
from .errors import SaaError, one_line_warnings
from .image_io import check_output_file
from .inputs import SUMMARY_NAME, batch_inputs
from .outputs.batch import announce, process, save_gallery
from .outputs.files import unique_stems
from .outputs.gallery import GALLERY_NAME
from .outputs.summary import RunSummary
from .outputs.watch import FolderWatch
from .pipeline import Pipeline
from .settings import add_settings_arguments, settings_from_args

MAX_OUT_SIZE = 16384  # square maps: 16384^2 float32 is 1 GB per map


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.infer", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--out-size", type=int, default=None, help="square output size (default: the image's size)")
    parser.add_argument("--saliency-mode", choices=["farthest", "nearest"], help="farthest: reference code; nearest: paper")
    parser.add_argument("--saliency-n", type=int, help="neighbours averaged per position (reference: 400)")
    parser.add_argument("--joined-captions", action="store_true",
                        help="GroundingDINO once per image on all the captions joined (its multi-phrase caption): "
                             "faster, but not the reference algorithm (options: {joined_captions: true} in a config)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    watch = parser.add_argument_group("watching a folder (a camera saving frames into it)")
    watch.add_argument("--watch", action="store_true",
                       help="take the images that arrive in the one input folder, as they arrive, until Ctrl-C")
    watch.add_argument("--watch-idle", type=float, metavar="SECONDS", help="end the watch after this long without a new image")
    watch.add_argument("--watch-count", type=int, metavar="N", help="end the watch after N images")
    line = parser.add_argument_group("line-side decisions (docs/line-side.md)")
    line.add_argument("--calibration", help="thresholds from `python -m runtime.calibrate` (checked against the engines)")
    line.add_argument("--image-threshold", type=float, help="NG when the image score (map max) exceeds it")
    line.add_argument("--pixel-threshold", type=float, help="defect mask where the map exceeds it (<stem>_mask.png)")
    line.add_argument("--memory", help="normal memory file from `python -m runtime.memory`")
    line.add_argument("--stream-memory", type=int, metavar="N",
                      help="learn from parts judged normal into a memory of at most N features")
    line.add_argument("--save-memory", help="write the memory (with the stream's state) here at the end")
    add_settings_arguments(parser)
    return parser


def options_from_args(args: argparse.Namespace) -> dict:
    options = {}
    if args.saliency_mode:
        options["saliency_mode"] = args.saliency_mode
    if args.saliency_n is not None:
        options["saliency_n"] = args.saliency_n
    if args.joined_captions:
        options["joined_captions"] = True
    return options


@one_line_warnings
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    try:
        if args.save_memory:
            check_output_file(args.save_memory, "--save-memory")  # now, not after all the images
        pipeline = Pipeline.open(args.engine_dir, dataset=args.dataset, category=args.category, config=args.config,
                                 settings=settings_from_args(args), options=options_from_args(args),
                                 calibration=args.calibration, memory=args.memory, stream_memory=args.stream_memory,
                                 image_threshold=args.image_threshold, pixel_threshold=args.pixel_threshold)
    except SaaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with pipeline:
        out_dir = Path(args.out)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"error: cannot create output folder {out_dir}: {err.strerror}", file=sys.stderr)
            return 2
        try:
            summary = RunSummary(out_dir)
        except SaaError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        with summary:
            if args.watch:
                watch = FolderWatch(Path(args.inputs[0]), exclude=out_dir, idle_s=args.watch_idle,
                                    stop_after=args.watch_count)
                try:  # the first frame from the line should not be the slowest
                    seconds = pipeline.warm_up()
                except SaaError as err:
                    print(f"error: warm-up failed: {err}", file=sys.stderr)
                    return 2
                print(f"watching {args.inputs[0]} for new images ({len(watch.existing)} there already are left alone; "
                      f"warmed up in {seconds:.1f} s); Ctrl-C ends the watch", file=sys.stderr)
                paths: Iterable[Path] = watch
                stems: dict[Path, str] = {}  # named as they arrive (next_stem)
            else:
                paths, earlier = batch_inputs(args.inputs, out_dir)  # this and earlier runs' outputs are not parts
                if earlier:
                    print(f"left out {len(earlier)} earlier output folder(s) among the inputs (they hold a "
                          f"runtime.infer {SUMMARY_NAME}): {', '.join(map(str, earlier[:5]))}"
                          f"{' ...' if len(earlier) > 5 else ''}", file=sys.stderr)
                if not paths:
                    print("error: no images found in the inputs", file=sys.stderr)
                    return 2
                stems = unique_stems(paths)
            announce(pipeline, args.engine_dir, args.joined_captions)
            kind = "saliency-only maps (lite engines)" if pipeline.saliency_only else "anomaly maps"
            title = f"SAA+ {kind}: {args.category or args.config}"
            tally = process(paths, stems, pipeline, out_dir, summary, title, out_size=args.out_size,
                            watching=args.watch, show_progress=not args.no_progress)
        saved = summary.error is None
        if summary.error:
            print(f"error: {summary.error}", file=sys.stderr)
        gallery_saved = save_gallery(out_dir, summary, title)
        saved = gallery_saved and saved
        if args.save_memory:
            try:
                pipeline.save_memory(args.save_memory)
            except SaaError as err:
                saved = False
                print(f"error: {err}", file=sys.stderr)
    done = tally.processed
    pages = f", overlays by score: {GALLERY_NAME}" if gallery_saved else ""
    table = summary.path.name if summary.error is None else f"{summary.path.name}, incomplete"
    print(f"{done - len(tally.failures)} of {done} images written to {out_dir} (table: {table}{pages})", file=sys.stderr)
    if tally.inexact:
        print(f"{tally.inexact} of them not run exactly as the reference algorithm takes them (exact=no; their JSON "
              "notes give the detector size that would)", file=sys.stderr)
    if pipeline.thresholds.image is not None:
        print(f"{tally.rejected} NG, {done - len(tally.failures) - tally.rejected} OK at image threshold "
              f"{pipeline.thresholds.image:.6g}", file=sys.stderr)
    if tally.interrupted:
        return 130
    return 1 if tally.failures or not saved else 0


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse impossible requests before any work (parser.error exits with the message)."""
    if args.out_size is not None and not 1 <= args.out_size <= MAX_OUT_SIZE:
        parser.error(f"--out-size must be from 1 to {MAX_OUT_SIZE}, got {args.out_size}")
    if args.save_memory and args.memory is None and args.stream_memory is None:
        parser.error("--save-memory needs a memory to save: --memory FILE or --stream-memory N")
    if args.watch and (len(args.inputs) != 1 or not Path(args.inputs[0]).is_dir()):
        parser.error(f"--watch takes one folder to watch, got {' '.join(args.inputs)}")
    if not args.watch and (args.watch_idle is not None or args.watch_count is not None):
        parser.error("--watch-idle and --watch-count need --watch")
    if (args.watch_idle is not None and not args.watch_idle > 0) or (args.watch_count is not None and args.watch_count < 1):
        parser.error("--watch-idle must be > 0 seconds and --watch-count >= 1")
    out = Path(args.out).resolve()
    for item in args.inputs:  # everything under the output folder is left out as earlier outputs
        if Path(item).is_dir() and Path(item).resolve().is_relative_to(out):
            parser.error(f"the input folder {item} is the output folder {args.out} or inside it, whose files are "
                         "left out as earlier outputs: give --out a folder of its own")
    if (out / "manifest.json").is_file():
        parser.error(f"--out {args.out} is an engines dir (it holds manifest.json): write the outputs elsewhere "
                     "(export --force there would delete them)")


if __name__ == "__main__":
    sys.exit(main())
