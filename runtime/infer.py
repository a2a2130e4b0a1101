"""`python -m runtime.infer`: anomaly maps, overlays and region JSON for images or folders.

    python -m runtime.infer --engine-dir engines/ --dataset mtd --category mtd IMAGE_OR_DIR... --out out/
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .config import add_config_arguments
from .engine.sessions import DEVICES
from .errors import SaaError, one_line_warnings
from .image_io import check_output_file, list_images, read_image, write_bytes, write_image
from .outputs.overlay import overlay
from .pipeline import JOINED_CAPTIONS_NOTE, RANDOM_WEIGHTS_NOTE, AnomalyResult, Pipeline
from .outputs.gallery import GALLERY_NAME, write_gallery
from .outputs.summary import SUMMARY_NAME, RunSummary, earlier_run_folders
from .outputs.watch import FolderWatch


MAX_OUT_SIZE = 16384  # square maps: 16384^2 float32 is 1 GB per map
GALLERY_EVERY = 10  # a watch rewrites index.html after this many images (and at its end)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.infer", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="cpu", choices=list(DEVICES))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per engine (0: onnxruntime's default)")
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


def write_outputs(result: AnomalyResult, image: np.ndarray, out_dir: Path, stem: str,
                  thresholds: dict | None = None) -> None:
    """<stem>_map.npy (exact), <stem>_map.png (16-bit, scaled by the JSON's png_max), overlay, regions JSON,
    and <stem>_mask.png (0/255) when a pixel threshold is set."""
    values = result.anomaly_map.astype(np.float32)
    exact = io.BytesIO()
    np.save(exact, values)
    write_bytes(out_dir / f"{stem}_map.npy", exact.getvalue())
    png_max = float(values.max()) if values.size and values.max() > 0 else 1.0
    write_image(out_dir / f"{stem}_map.png", np.round(np.clip(values / png_max, 0, 1) * 65535).astype(np.uint16))
    write_image(out_dir / f"{stem}_overlay.png", overlay(image, values, result))
    if result.pred_mask is not None:
        write_image(out_dir / f"{stem}_mask.png", result.pred_mask.astype(np.uint8) * 255)
    payload = {"image": stem, "map_shape": list(values.shape), "map_max": float(values.max()), "png_max": png_max,
               **({"thresholds": thresholds} if thresholds is not None else {}),
               **result.regions_json(), "timings_ms": {k: round(v, 2) for k, v in result.timings_ms.items()},
               "engine_ms": {k: round(v, 2) for k, v in result.engine_ms.items()}}  # each stage's share inside onnxruntime
    write_bytes(out_dir / f"{stem}_regions.json", json.dumps(payload, indent=1).encode())


@dataclass
class Tally:
    """What a run did: images done (written or failed), the failures, NG verdicts, a batch's Ctrl-C."""

    processed: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)
    rejected: int = 0
    interrupted: bool = False


@one_line_warnings
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    try:
        if args.save_memory:
            check_output_file(args.save_memory, "--save-memory")  # now, not after all the images
        pipeline = Pipeline.open(args.engine_dir, dataset=args.dataset, category=args.category, config=args.config,
                                 device=args.device, threads=args.threads, options=options_from_args(args),
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
                earlier = [folder for folder in earlier_run_folders(args.inputs)
                           if not folder.resolve().is_relative_to(out_dir.resolve())]
                if earlier:
                    print(f"left out {len(earlier)} earlier output folder(s) among the inputs (they hold a "
                          f"runtime.infer {SUMMARY_NAME}): {', '.join(map(str, earlier[:5]))}"
                          f"{' ...' if len(earlier) > 5 else ''}", file=sys.stderr)
                # this run's and earlier runs' maps and overlays are not parts
                paths = list_images(args.inputs, exclude=[out_dir, *earlier])
                if not paths:
                    print("error: no images found in the inputs", file=sys.stderr)
                    return 2
                stems = unique_stems(paths)
            if pipeline.random_weights:
                print(f"warning: {args.engine_dir}: {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
            if pipeline.saliency_only:
                print(f"{args.engine_dir}: lite engines: saliency-only anomaly maps (no GroundingDINO/SAM)", file=sys.stderr)
                if args.joined_captions:
                    print("warning: --joined-captions changes nothing with lite engines (no GroundingDINO)", file=sys.stderr)
            elif pipeline.config.options.joined_captions:
                print(f"{JOINED_CAPTIONS_NOTE} (faster; compare it on your parts: bench.compare_engines)", file=sys.stderr)
            kind = "saliency-only maps (lite engines)" if pipeline.saliency_only else "anomaly maps"
            title = f"SAA+ {kind}: {args.category or args.config}"
            tally = _process(paths, stems, pipeline, out_dir, args, summary, title)
        saved = summary.error is None
        if summary.error:
            print(f"error: {summary.error}", file=sys.stderr)
        gallery_saved = _write_gallery(out_dir, summary, title)
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


def _process(paths: Iterable[Path], stems: dict[Path, str], pipeline: Pipeline, out_dir: Path,
             args: argparse.Namespace, summary: RunSummary, title: str) -> Tally:
    """Each image through the pipeline into its outputs and its table row; a failure is reported
    and the run goes on; Ctrl-C ends it with the table and page kept."""
    tally = Tally()
    taken = set(stems.values())
    progress = _progress(paths, disable=args.no_progress)
    try:
        for path in progress:
            stem = stems[path] if path in stems else next_stem(path, taken)
            try:
                image = read_image(path)
                result = pipeline(image, out_size=args.out_size)
                write_outputs(result, image, out_dir, stem, pipeline.thresholds.to_json())
                tally.rejected += result.pred_label or 0
            except SaaError as err:
                tally.failures.append((path, str(err)))
                progress.write(f"failed: {err}", file=sys.stderr)
                summary.add_failure(path, stem, str(err))
            else:
                summary.add(path, stem, result)
            tally.processed += 1
            if args.watch and tally.processed % GALLERY_EVERY == 0:
                _write_gallery(out_dir, summary, title)
    except KeyboardInterrupt:  # the watch's normal end; a batch's early one
        tally.interrupted = not args.watch
        progress.close()
        count = tally.processed
        print(f"{'watch ended' if args.watch else 'interrupted'} after {count} image{'' if count == 1 else 's'}",
              file=sys.stderr)
    return tally


def _write_gallery(out_dir: Path, summary: RunSummary, title: str) -> bool:
    try:
        write_gallery(out_dir, summary.rows, title, summary.counts)
        return True
    except OSError as err:
        print(f"error: cannot write {out_dir / GALLERY_NAME}: {err.strerror}", file=sys.stderr)
        return False


def unique_stems(paths: list[Path]) -> dict[Path, str]:
    """Each file's stem; where stems collide, folder + file name (suffix kept), then a counter."""
    counts: dict[str, int] = {}
    for path in paths:
        counts[path.stem] = counts.get(path.stem, 0) + 1
    stems: dict[Path, str] = {}
    taken: set[str] = set()
    for path in paths:
        stem = path.stem if counts[path.stem] == 1 else _folder_and_name(path)
        stems[path] = _claim(_readable(stem), taken)
    return stems


def next_stem(path: Path, taken: set[str]) -> str:
    """A watched file's stem, decided as it arrives (later arrivals are unknown): its stem, else
    folder + file name, then a counter; added to taken."""
    stem = _readable(path.stem)
    return _claim(stem if stem not in taken else _readable(_folder_and_name(path)), taken)


def _folder_and_name(path: Path) -> str:
    return f"{path.parent.name}_{path.name.replace('.', '_')}"


def _readable(stem: str) -> str:
    return stem.encode("utf-8", "replace").decode("utf-8")  # bytes no encoding can show (not UTF-8) -> "?"


def _claim(stem: str, taken: set[str]) -> str:
    """`stem`, or with a counter where taken already has it; added to taken."""
    candidate, index = stem, 1
    while candidate in taken:
        candidate, index = f"{stem}_{index}", index + 1
    taken.add(candidate)
    return candidate


def _progress(paths: list[Path], disable: bool):
    from tqdm import tqdm

    return tqdm(paths, unit="img", disable=disable, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
