"""`python -m runtime.warm --engine-dir E`: compile the runtime's numba kernels into their cache once.

numba compiles each kernel on its first call and keeps the machine code in its cache (the
kernels' __pycache__, or NUMBA_CACHE_DIR): without this step a machine's first image pays that
(seconds to tens of seconds on a small CPU), every later one loads it. `python -m export` runs this
on the engines it wrote, so a newcomer's first part is as fast as the second. Run it again after
upgrading numba. The kernels of the normal memory run too, on synthetic frames.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import numpy as np

from .errors import SaaError, one_line_warnings
from .settings import add_settings_arguments, settings_from_args

WARM_PROMPTS = {"lite": ("mtd", "mtd"), "full": ("mvtec", "bottle")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.warm", description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", required=True, help="folder written by `python -m export`")
    add_settings_arguments(parser)
    return parser


@one_line_warnings
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .lineside.normal_memory import MemorySettings, NormalMemory
    from .manifest import load_manifest
    from .pipeline import Pipeline

    start = time.perf_counter()
    try:
        profile = load_manifest(args.engine_dir, verify_hashes=False).profile
        dataset, category = WARM_PROMPTS.get(profile, WARM_PROMPTS["full"])
        with Pipeline.open(args.engine_dir, dataset=dataset, category=category, settings=settings_from_args(args),
                           verify_hashes=False) as pipeline:
            pipeline.warm_up()
            frames = np.random.default_rng(1).integers(0, 256, (2, 240, 320, 3), dtype=np.uint8)
            memory = NormalMemory.from_images(pipeline.saliency, pipeline.manifest,
                                              ((f"warm{i}.png", frame) for i, frame in enumerate(frames)),
                                              MemorySettings(capacity=256))
            memory.grids(pipeline.saliency, frames[0])
    except SaaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"compiled the runtime's kernels in {time.perf_counter() - start:.1f} s (cached: later runs load them)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
