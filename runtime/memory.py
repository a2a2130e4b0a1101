"""`python -m runtime.memory`: a memory of normal parts from good images (runtime/lineside/normal_memory.py).

    python -m runtime.memory --engine-dir E (--dataset D --category C | --config F) --good DIR
        --out memory.npz [--capacity N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .config import add_config_arguments
from .errors import ConfigError, SaaError, one_line_warnings
from .inputs import list_parts
from .lineside.normal_memory import DEFAULT_BLEND, DEFAULT_BLUR_SIGMA, DEFAULT_CAPACITY, MemorySettings, NormalMemory
from .settings import add_settings_arguments, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.memory", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--good", required=True, nargs="+", help="good images or folders of them")
    parser.add_argument("--out", required=True, help="memory file to write (.npz)")
    parser.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY, help="most features kept")
    parser.add_argument("--k", type=int, default=1, help="nearest memory features averaged per position")
    parser.add_argument("--blend", type=float, default=DEFAULT_BLEND,
                        help="weight of the memory distance in the saliency (0: zero-shot .. 1: memory only)")
    parser.add_argument("--blur-sigma", type=float, default=DEFAULT_BLUR_SIGMA,
                        help="Gaussian blur of the memory distance grid, in grid cells")
    add_settings_arguments(parser)
    return parser


@one_line_warnings
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .image_io import read_image
    from .pipeline import Pipeline

    try:
        settings = MemorySettings(args.capacity, args.k, args.blend, args.blur_sigma).checked()
        # folders as runtime.calibrate reads them: a mask beside an image (MTD's <name>.png) is no part
        paths = [p for item in args.good
                 for p in ([part for part, _ in list_parts(item)] if Path(item).is_dir() else [Path(item)])]
        if not paths:
            raise ConfigError(f"no images found in {' '.join(args.good)}")
        # The pipeline's own saliency extractor: the memory gets exactly the features inference will see.
        with Pipeline.open(args.engine_dir, args.dataset, args.category, args.config,
                           settings=settings_from_args(args)) as pipeline:
            memory = NormalMemory.from_images(pipeline.saliency, pipeline.manifest,
                                              ((p.name, read_image(p)) for p in paths), settings)
        sha = memory.save(args.out)
    except SaaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(memory)} features from {len(memory.images)} good images (sha256 {sha})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
