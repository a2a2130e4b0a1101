"""`python -m bench.fp16_head`: what a plain fp16 GroundingDINO head would change, measured.

The head (text-image fusion, 6 encoder and 6 decoder layers for every caption) stays fp32 in fp16
engines. It is also most of the GPU time (docs/latency.md). This converts a copy of an engine
dir's head the way `export --precision fp16` converts the other graphs. It then compares the two
on the export's precision inputs: logits and boxes, and the share of the top-900 query selection
that changes. The engine dir is not modified. Needs the export extras (torch, onnx).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import onnxruntime as ort


def compare_head_fp16(engine_dir: Path) -> dict[str, Any]:
    """fp16-vs-fp32 record of `engine_dir`'s head, converted in a scratch copy (CPU provider)."""
    from export import common
    from runtime import manifest as mf

    names = [mf.GDINO_IMAGE, mf.GDINO_TEXT, mf.GDINO_HEAD]
    for name in names:
        if not (engine_dir / f"{name}.onnx").is_file():
            raise FileNotFoundError(f"{engine_dir} has no {name}.onnx: a `full` profile engine dir is needed")
    feeds = common.precision_feeds(engine_dir, names)[mf.GDINO_HEAD]
    with tempfile.TemporaryDirectory() as scratch:
        head = Path(scratch) / "gdino_head.onnx"
        shutil.copy(engine_dir / "gdino_head.onnx", head)
        expected = common._run_all(head, feeds, "CPUExecutionProvider")
        conversion = common.convert_to_fp16(head)
        parity = common.fp16_parity(expected, head, feeds, "CPUExecutionProvider")
    return {"conversion": conversion, "fp16_vs_fp32": parity}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fp16_head", description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", type=Path, required=True, help="a `full` profile engine dir (fp32 head)")
    parser.add_argument("--out", type=Path, help="JSON file to write the record to")
    args = parser.parse_args(argv)
    from runtime.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(args.engine_dir)
        compared = compare_head_fp16(args.engine_dir)
    except (ManifestError, FileNotFoundError) as err:
        parser.error(str(err))
    record = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "engine_dir": str(args.engine_dir),
        "weights_source": manifest.models.get("gdino_head", {}).get("source"),
        "onnxruntime": ort.__version__,
        **compared,
    }
    parity = record["fp16_vs_fp32"]
    mismatch = max((case.get("index_mismatch", 0.0) for case in parity["cases"]), default=0.0)
    print(f"fp16 head vs fp32: max |diff| {parity['max_abs_diff']:.3g} (relative {parity['relative']:.3g}), "
          f"top-900 selection changed for {100 * mismatch:.1f}% of the queries")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
