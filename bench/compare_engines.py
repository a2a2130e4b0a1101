"""`python -m bench.compare_engines`: do two engine set-ups give the same results on my parts?

    python -m bench.compare_engines --engine-dir engines/ --other engines-fp16/ --dataset mvtec --category bottle IMAGES...
    python -m bench.compare_engines --engine-dir engines/ --other-env SAA_CUDA_TF32=head --device cuda ... IMAGES...
    python -m bench.compare_engines --engine-dir engines/ --other-option joined_captions=true ... IMAGES...

Before a cheaper set-up goes on a line (fp16 engines, GroundingDINO's head in fp16 from
`bench.experiments.fp16_head --write-engines`, TF32, another onnxruntime), run it against the faithful one
on real parts with the real checkpoints: the comparison that matters is of what the line sees,
not of raw logits. Per image, both pipelines run on the same pixels and this reports the anomaly
maps' largest difference (absolute, and relative to the faithful map's maximum) and the share of
pixels more than 1e-4 apart, the image scores,
the OK/NG labels where `--image-threshold` is given, and the fused defect regions matched by
prompt and box IoU >= 0.5 (matched, only in the faithful run, only in the other). `--other-env`
sets environment switches (SAA_CUDA_TF32, SAA_CUDA_GRAPHS, ...) and `--other-option` algorithm
options (joined_captions, max_boxes_per_prompt, ...) for the other pipeline only; without `--other`
both use the same engines dir. With random weights the figures say nothing
about accuracy: they are for real checkpoints.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .latency import BenchError, parse_options

MATCH_IOU = 0.5


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `values` set inside the block (pipelines read their switches when their
    sessions open, and some open on their first call), restored after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def match_regions(faithful: Sequence[Any], other: Sequence[Any]) -> dict[str, int]:
    """Fused regions of two runs matched one to one, greedily by IoU, within the same prompt."""
    from runtime.stages.regions import box_iou

    a = [r for r in faithful if r.in_top_k]
    b = [r for r in other if r.in_top_k]
    used: set[int] = set()
    matched = 0
    for region in a:
        candidates = [j for j, o in enumerate(b) if j not in used and o.prompt == region.prompt]
        if not candidates:
            continue
        ious = box_iou(np.array([region.box], np.float32), np.array([b[j].box for j in candidates], np.float32))[0]
        best = int(np.argmax(ious))
        if ious[best] >= MATCH_IOU:
            used.add(candidates[best])
            matched += 1
    return {"matched": matched, "only_faithful": len(a) - matched, "only_other": len(b) - matched}


def compare_results(faithful: Any, other: Any) -> dict[str, Any]:
    """One image's two AnomalyResults -> the figures a line cares about."""
    from bench.reference.compare import compare_maps

    maps = compare_maps(faithful.anomaly_map, other.anomaly_map)
    diff = maps["max_abs_diff"]
    scale = float(np.max(np.abs(faithful.anomaly_map))) or 1.0
    record = {
        "map_max_abs_diff": diff,
        "map_relative_diff": diff / scale,
        "map_differing_pixel_share": maps["differing_pixel_share"],  # pixels > 1e-4 apart
        "score": faithful.pred_score,
        "other_score": other.pred_score,
        "regions": match_regions(faithful.regions, other.regions),
    }
    if faithful.pred_label is not None:
        record["label"], record["other_label"] = faithful.pred_label, other.pred_label
    return record


def summarise(images: Sequence[dict[str, Any]]) -> dict[str, Any]:
    done = [i for i in images if "failed" not in i]
    if not done:
        return {"images": 0, "failed": len(images)}
    same_regions = [i for i in done if not i["regions"]["only_faithful"] and not i["regions"]["only_other"]]
    summary: dict[str, Any] = {
        "images": len(done),
        "failed": len(images) - len(done),
        "map_max_abs_diff": max(i["map_max_abs_diff"] for i in done),
        "map_relative_diff_max": max(i["map_relative_diff"] for i in done),
        "map_differing_pixel_share_max": max(i["map_differing_pixel_share"] for i in done),
        "score_max_abs_diff": max(abs(i["score"] - i["other_score"]) for i in done),
        "images_with_the_same_fused_regions": len(same_regions),
        "regions_matched": sum(i["regions"]["matched"] for i in done),
        "regions_only_faithful": sum(i["regions"]["only_faithful"] for i in done),
        "regions_only_other": sum(i["regions"]["only_other"] for i in done),
    }
    labelled = [i for i in done if "label" in i]
    if labelled:
        summary["labels_agree"] = sum(i["label"] == i["other_label"] for i in labelled)
    return summary


def _parse_env(pairs: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"--other-env takes KEY=VALUE, got {pair!r}")
        values[key] = value
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare_engines", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--engine-dir", type=Path, required=True, help="the faithful set-up's engines")
    parser.add_argument("--other", type=Path, help="the other set-up's engines (default: the same dir)")
    parser.add_argument("--other-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment switch for the other pipeline only (repeatable)")
    parser.add_argument("--other-option", action="append", default=[], metavar="KEY=VALUE",
                        help="algorithm option for the other pipeline only, e.g. joined_captions=true (repeatable)")
    parser.add_argument("--dataset")
    parser.add_argument("--category")
    parser.add_argument("--config", help="a prompt config file instead of --dataset/--category")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-threshold", type=float, help="compare OK/NG labels at this image score")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    other_env = _parse_env(args.other_env, parser)
    try:
        other_options = parse_options(args.other_option)
    except BenchError as err:
        parser.error(str(err).replace("--option", "--other-option"))
    other_dir = args.other or args.engine_dir
    if other_dir == args.engine_dir and not other_env and not other_options:
        parser.error("nothing to compare: give --other ENGINES, --other-env KEY=VALUE and/or --other-option KEY=VALUE")
    from runtime.errors import SaaError
    from runtime.image_io import read_image
    from runtime.inputs import list_images
    from runtime.pipeline import Pipeline

    opened = dict(dataset=args.dataset, category=args.category, config=args.config, device=args.device,
                  image_threshold=args.image_threshold)
    try:
        faithful = Pipeline.open(args.engine_dir, **opened)
        with environment(other_env):
            other = Pipeline.open(other_dir, **opened, options=other_options)
    except SaaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = list_images(args.images)
    if not paths:
        print("error: no images found in the inputs", file=sys.stderr)
        return 2
    images = []
    print(f"{'image':40s} {'map diff':>9s} {'rel':>8s} {'pixels':>8s} {'score':>9s} {'other':>9s} {'regions a/b/both':>17s}")
    for path in paths:
        try:
            image = read_image(path)
            first = faithful(image)
            with environment(other_env):
                second = other(image)
            record = {"image": str(path), **compare_results(first, second)}
        except SaaError as err:
            record = {"image": str(path), "failed": str(err)}
            print(f"{path.name[:40]:40s} failed: {err}")
        else:
            regions = record["regions"]
            print(f"{path.name[:40]:40s} {record['map_max_abs_diff']:9.3g} {record['map_relative_diff']:8.2g} "
                  f"{100 * record['map_differing_pixel_share']:7.3f}% "
                  f"{record['score']:9.4g} {record['other_score']:9.4g} "
                  f"{regions['only_faithful']:5d}/{regions['only_other']}/{regions['matched']}")
        images.append(record)
    faithful.close()
    other.close()
    summary = summarise(images)
    print(json.dumps(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "engine_dir": str(args.engine_dir), "other": str(other_dir), "other_env": other_env,
            "other_options": other_options, "device": args.device,
            "config": args.config or f"{args.dataset}/{args.category}", "image_threshold": args.image_threshold,
            "summary": summary, "images": images}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 1 if summary.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
