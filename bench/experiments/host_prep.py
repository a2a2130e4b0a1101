"""`python -m bench.experiments.host_prep`: the host-side image preparation of a full pipeline, timed alone.

GroundingDINO's and SAM's inputs (PIL-exact resize, normalise into the padded canvas) are host
work in every stage that feeds a GPU; this times them without the graphs, so a change to them
can be compared on any machine. `--label` names the run in the JSON (e.g. a commit).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.latency import summarize

REPO = Path(__file__).resolve().parents[2]


def _median_ms(call: Callable[[], Any], iters: int) -> float:
    call()  # first call: numba compiles or loads its cache
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return summarize(times)["p50_ms"]


def time_preparation(engine_dir: Path, image_path: Path, iters: int) -> dict[str, Any]:
    import numba

    from runtime import manifest as mf
    from runtime.stages.detector import Detector
    from runtime.image_io import read_image
    from runtime.stages.segmenter import Segmenter
    from runtime.engine.sessions import session_factory
    from runtime.settings import EngineSettings

    manifest = mf.load_manifest(engine_dir)
    make = session_factory(EngineSettings(threads=1))
    image = read_image(image_path)
    rgb = np.ascontiguousarray(image[:, :, ::-1])
    from runtime.engine.pixels import normalised_canvas
    from runtime.engine.resize import longest_side_shape, resize_like_pil

    detector, segmenter = Detector(manifest, make), Segmenter(manifest, make)
    # Each input's two steps alone, to tell which one is worth moving to the device.
    gdino_hw, _ = detector.content_shape(*rgb.shape[:2])
    sam_hw = longest_side_shape(*image.shape[:2], segmenter.image_size)
    gdino_resized, sam_resized = resize_like_pil(rgb, gdino_hw), resize_like_pil(image, sam_hw)
    return {
        "gdino_input_ms": _median_ms(lambda: detector.preprocess(rgb), iters),
        "sam_input_ms": _median_ms(lambda: segmenter.preprocess(image), iters),
        "gdino_resize_ms": _median_ms(lambda: resize_like_pil(rgb, gdino_hw), iters),
        "gdino_normalise_ms": _median_ms(lambda: normalised_canvas(
            gdino_resized, (detector.height, detector.width), detector.mean, detector.std, divisor=255.0), iters),
        "sam_resize_ms": _median_ms(lambda: resize_like_pil(image, sam_hw), iters),
        "sam_normalise_ms": _median_ms(lambda: normalised_canvas(
            sam_resized, (segmenter.image_size, segmenter.image_size), segmenter.pixel_mean, segmenter.pixel_std), iters),
        "gdino_canvas": [detector.height, detector.width],
        "sam_canvas": segmenter.image_size,
        "numba_threads": numba.get_num_threads(),
        "runtime": str(Path(mf.__file__).parent),  # which tree's runtime ran (PYTHONPATH can point at another)
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.host_prep", description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", type=Path, required=True, help="a full engines dir (its preprocess settings)")
    parser.add_argument("--image", type=Path, default=REPO / "tests" / "data" / "bottle_demo.png")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--label", default="", help="what this run measured (e.g. a commit)")
    parser.add_argument("--out", type=Path, help="append the run to this JSON file (a list of runs)")
    args = parser.parse_args(argv)
    from runtime.errors import SaaError

    try:
        record = time_preparation(args.engine_dir, args.image, args.iters)
    except SaaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record.update(label=args.label, image=args.image.name, iters=args.iters, cpu_count=os.cpu_count(),
                  created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    print(f"{args.label or 'this tree'}: GroundingDINO input {record['gdino_input_ms']:.1f} ms "
          f"(resize {record['gdino_resize_ms']:.1f}, normalise {record['gdino_normalise_ms']:.1f}), "
          f"SAM input {record['sam_input_ms']:.1f} ms (resize {record['sam_resize_ms']:.1f}, "
          f"normalise {record['sam_normalise_ms']:.1f}) (median of {args.iters}, {record['numba_threads']} numba threads)")
    if args.out:
        runs = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.write_text(json.dumps(runs + [record], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
