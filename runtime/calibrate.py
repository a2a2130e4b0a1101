"""`python -m runtime.calibrate`: image and pixel thresholds from good parts (and defect examples).

    python -m runtime.calibrate --engine-dir E (--dataset D --category C | --config F) --good DIR
        [--defects DIR] [--memory FILE] [--false-reject-rate R] --out calibration.json

How the thresholds are chosen, and what the file records: runtime/lineside/calibration.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .config import add_config_arguments
from .errors import SaaError, one_line_warnings
from .image_io import check_output_file, write_bytes
from .inputs import list_parts
from .lineside.calibration import DEFAULT_FALSE_REJECT_RATE, calibrate
from .settings import add_settings_arguments, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.calibrate", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--good", required=True, help="folder of good parts (subfolders included)")
    parser.add_argument("--defects", help="folder of defect parts, subfolders included (masks beside them or in masks/)")
    parser.add_argument("--memory", help="normal memory file (runtime.memory) to calibrate with")
    parser.add_argument("--false-reject-rate", type=float, default=DEFAULT_FALSE_REJECT_RATE,
                        help="good parts allowed to fail the image threshold (good-only rule)")
    parser.add_argument("--image-rule", default="auto", choices=["auto", "false-reject", "max-f1"],
                        help="auto: max-f1 with --defects, else false-reject")
    parser.add_argument("--out", required=True, help="calibration JSON to write")
    add_settings_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="print each image's score")
    return parser


@one_line_warnings
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .pipeline import Pipeline

    try:
        check_output_file(args.out, "--out")  # before calibrating, not after
        good = list_parts(args.good)
        defects = list_parts(args.defects) if args.defects else []
        with Pipeline.open(args.engine_dir, args.dataset, args.category, args.config,
                           settings=settings_from_args(args), memory=args.memory) as pipeline:
            record = calibrate(pipeline, good, defects, args.false_reject_rate, args.image_rule, args.verbose)
        write_bytes(args.out, (json.dumps(record, indent=1) + "\n").encode())
    except SaaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    thresholds = record["thresholds"]
    print(f"{args.out}: image threshold {thresholds['image']:.6g} ({record['rules']['image']}); pixel threshold "
          f"{thresholds['pixel']:.6g} ({record['rules']['pixel']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
