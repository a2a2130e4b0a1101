"""`python -m bench.experiments.fp16_head`: what a plain fp16 GroundingDINO head would change, measured.

The head (text-image fusion, 6 encoder and 6 decoder layers for every caption) stays fp32 in fp16
engines. It is also most of the GPU time (docs/performance.md). This converts a copy of an engine
dir's head the way `export --precision fp16` converts the other graphs. It then compares the two
on the export's precision inputs: logits and boxes, and the share of the top-900 query selection
that changes. The engine dir is not modified. Needs the export extras (torch, onnx).

`--write-engines DIR` also writes a complete engines dir with that fp16 head (the other files
hard-linked, or copied across file systems), for timing it: `python -m bench.latency
--engine-dir DIR`. Its manifest says what it is (`precision` "<precision>-head-fp16", a
`variant` line, the head's fp16-vs-fp32 record), and the latency notes repeat it. It is for
measuring what a lower-precision head would buy, not for inspection: with random weights it
changes most detections.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import onnxruntime as ort


HEAD_VARIANT = ("GroundingDINO's head converted to fp16 after export by bench.experiments.fp16_head: not the export's "
                "faithful fp32 head; for timing what a lower-precision head would buy")


def compare_head_fp16(engine_dir: Path, keep_as: Path | None = None) -> dict[str, Any]:
    """fp16-vs-fp32 record of `engine_dir`'s head, converted in a scratch copy (CPU provider);
    keep_as: where to move the converted head afterwards."""
    from export import precision
    from runtime import manifest as mf

    names = [mf.GDINO_IMAGE, mf.GDINO_TEXT, mf.GDINO_HEAD]
    feeds = precision.precision_feeds(engine_dir, names)[mf.GDINO_HEAD]
    with tempfile.TemporaryDirectory() as scratch:
        head = Path(scratch) / "gdino_head.onnx"
        shutil.copy(engine_dir / "gdino_head.onnx", head)
        expected = precision._run_all(head, feeds, "CPUExecutionProvider")
        conversion = precision.convert_to_fp16(head)
        parity = precision.fp16_parity(expected, head, feeds, "CPUExecutionProvider")
        if keep_as is not None:
            shutil.move(str(head), str(keep_as))
    return {"conversion": conversion, "fp16_vs_fp32": parity}


def write_fp16_head_engines(engine_dir: Path, out: Path) -> dict[str, Any]:
    """A complete engines dir at `out` (which must not exist): `engine_dir`'s files, its head
    converted to fp16, and a manifest that says so. Written beside `out` and moved into place."""
    from runtime import manifest as mf

    if out.exists():
        raise FileExistsError(f"{out} already exists: name a new folder for the fp16-head engines")
    manifest = mf.load_manifest(engine_dir)
    data = copy.deepcopy(manifest.data)
    if data.get("variant"):
        raise ValueError(f"{engine_dir} is already a variant ({data['variant']}); start from exported engines")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # a folder like any other, not mkdtemp's private 0700
    try:
        head_file = data["models"][mf.GDINO_HEAD]["file"]
        for source in engine_dir.iterdir():
            if source.is_file() and source.name not in (head_file, mf.MANIFEST_NAME):
                _link_or_copy(source, staging / source.name)
        compared = compare_head_fp16(engine_dir, keep_as=staging / head_file)
        head = data["models"][mf.GDINO_HEAD]
        head["sha256"] = mf.sha256_of(staging / head_file)
        head["size_bytes"] = (staging / head_file).stat().st_size
        head.setdefault("parity", {})["fp16_vs_fp32"] = compared["fp16_vs_fp32"]
        data["precision"] = f"{data.get('precision', 'fp32')}-head-fp16"
        data["variant"] = HEAD_VARIANT
        (staging / mf.MANIFEST_NAME).write_text(json.dumps(data, indent=1) + "\n")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return compared


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.fp16_head", description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", type=Path, required=True, help="a `full` profile engine dir (fp32 head)")
    parser.add_argument("--out", type=Path, help="JSON file to write the record to")
    parser.add_argument("--write-engines", type=Path, metavar="DIR",
                        help="also write a complete engines dir with the fp16 head here (a new folder), for bench.latency")
    args = parser.parse_args(argv)
    from runtime.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(args.engine_dir)
        if manifest.profile != "full":
            raise ManifestError(f"{args.engine_dir} holds {manifest.profile} engines: a `full` profile engine dir is needed")
        if args.write_engines is not None:
            compared = write_fp16_head_engines(args.engine_dir, args.write_engines)
        else:
            compared = compare_head_fp16(args.engine_dir)
    except (ManifestError, FileExistsError, ValueError) as err:
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
    if args.write_engines is not None:
        print(f"wrote {args.write_engines} (fp16 head; time it with python -m bench.latency --engine-dir {args.write_engines})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
