"""`python -m bench.gpu.compare`: which configurations give the boxes and maps of the faithful one.

    python -m bench.gpu.compare --engine-dir ENGINES --device cuda --candidates candidates.json --out compare.json

candidates.json: {"faithful": {"settings": {...}}, "candidates": [{"name", "settings", "options"}, ...]},
settings as EngineSettings fields (besides the device), options as the prompt config's algorithm
options. The faithful configuration (bench/gpu/plan.py: per caption, TF32 off, no CUDA graphs)
runs first on a few images (the bottle demo, mirrored, and turned a quarter; after the calls that
capture CUDA graphs and run the overlap's stages in order, so that what is compared is what a
line sees later); then each candidate,
in the order given (`python -m bench.gpu` gives them fastest first), on the same images. Per image
bench.compare_engines.compare_results compares the two; a candidate matches where every image keeps
the faithful run's fused regions (same prompt, box IoU >= 0.5) and at most plan.MATCH_PIXEL_SHARE
of the map's pixels differ by more than 1e-4. The comparison stops at the first match (a slower
one would not be named), or where `--time-limit` would be passed; `--all` compares every one.
Each pipeline is built from EngineSettings directly: no SAA_* variable changes a configuration.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.compare_engines import compare_results, summarise

from .plan import MATCH_PIXEL_SHARE

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "tests" / "data" / "bottle_demo.png"
DATASET, CATEGORY = "mvtec", "bottle"


def images() -> dict[str, np.ndarray]:
    from runtime.image_io import read_image

    bottle = read_image(IMAGE)
    return {"bottle_demo": bottle, "bottle_demo mirrored": np.ascontiguousarray(bottle[:, ::-1]),
            "bottle_demo turned": np.ascontiguousarray(np.rot90(bottle))}


def verdict(summary: dict[str, Any]) -> tuple[bool, str]:
    """Whether a candidate's summary (bench.compare_engines.summarise) matches the faithful run, and why."""
    if not summary.get("images") or summary.get("failed"):
        return False, f"{summary.get('failed', 0)} of the images failed"
    if summary["images_with_the_same_fused_regions"] != summary["images"]:
        return False, (f"fused regions differ on {summary['images'] - summary['images_with_the_same_fused_regions']} "
                       f"of {summary['images']} images ({summary['regions_only_faithful']} only in the faithful run, "
                       f"{summary['regions_only_other']} only in this one)")
    share = summary["map_differing_pixel_share_max"]
    if share > MATCH_PIXEL_SHARE:
        return False, f"{100 * share:.2f}% of a map's pixels differ by more than 1e-4 (at most {100 * MATCH_PIXEL_SHARE}%)"
    return True, (f"the same fused regions on {summary['images']} images, {100 * share:.3f}% of pixels differ, "
                  f"map max |diff| {summary['map_max_abs_diff']:.3g}")


def _run(engine_dir: Path, device: str, settings: dict[str, Any], options: dict[str, Any],
         pictures: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    from runtime.pipeline import Pipeline
    from runtime.settings import EngineSettings

    from runtime.engine.overlap import OVERLAP_AFTER_CALLS

    start = time.perf_counter()
    with Pipeline.open(engine_dir, dataset=DATASET, category=CATEGORY, options=options,
                       settings=EngineSettings(device=device, **settings)) as pipeline:
        first = next(iter(pictures.values()))
        for _ in range(OVERLAP_AFTER_CALLS):  # the calls that capture CUDA graphs and run the overlap in order
            pipeline(first)
        results = {name: pipeline(picture) for name, picture in pictures.items()}
        about = {"settings": pipeline.settings.to_json(), "cuda_graphs": pipeline.cuda_graphs,
                 "ops_fallback": getattr(pipeline, "ops_fallback", None)}
    about["wall_s"] = round(time.perf_counter() - start, 2)
    return results, about


def compare(engine_dir: Path, device: str, faithful: dict[str, Any], candidates: Sequence[dict[str, Any]],
            time_limit_s: float | None = None, every: bool = False) -> dict[str, Any]:
    pictures = images()
    start = time.perf_counter()
    expected, about = _run(engine_dir, device, faithful.get("settings", {}), faithful.get("options", {}), pictures)
    record: dict[str, Any] = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "engine_dir": str(engine_dir), "device": device, "config": f"{DATASET}/{CATEGORY}", "images": list(pictures),
        "match_rule": f"same fused regions on every image, at most {100 * MATCH_PIXEL_SHARE}% of pixels > 1e-4 apart",
        "faithful": {**faithful, **about, "regions": {name: len(r.regions) for name, r in expected.items()}},
        "candidates": [],
    }
    last = about["wall_s"]
    for candidate in candidates:
        entry = {"name": candidate["name"], "settings": candidate.get("settings", {}), "options": candidate.get("options", {})}
        elapsed = time.perf_counter() - start
        if time_limit_s is not None and elapsed + last > time_limit_s:
            entry.update(matches=None, why=f"not compared: {time_limit_s - elapsed:.0f} s left of the time limit")
            record["candidates"].append(entry)
            continue
        if not every and any(c.get("matches") for c in record["candidates"]):
            entry.update(matches=None, why="not compared: a faster configuration matched")
            record["candidates"].append(entry)
            continue
        try:
            got, about = _run(engine_dir, device, entry["settings"], entry["options"], pictures)
        except Exception as err:  # one configuration that cannot open is a finding, not the end
            entry.update(matches=False, why=f"failed: {str(err).splitlines()[0][:300]}")
            record["candidates"].append(entry)
            continue
        last = about["wall_s"]
        per_image = [{"image": name, **compare_results(expected[name], got[name])} for name in pictures]
        summary = summarise(per_image)
        matches, why = verdict(summary)
        entry.update(matches=matches, why=why, summary=summary, images=per_image, **about)
        record["candidates"].append(entry)
        print(f"{entry['name']:36s} {'matches' if matches else 'differs'}: {why}", flush=True)
    record["first_match"] = next((c["name"] for c in record["candidates"] if c.get("matches")), None)
    record["wall_s"] = round(time.perf_counter() - start, 2)
    return record


def _plain(value: Any) -> Any:
    """numpy scalars and arrays in the records, as JSON takes them."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda", "tensorrt"))
    parser.add_argument("--candidates", type=Path, required=True, help="JSON file (see the module doc)")
    parser.add_argument("--time-limit", type=float, help="seconds: candidates that would pass it are not compared")
    parser.add_argument("--all", action="store_true", help="compare every candidate, not up to the first match")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from runtime.errors import SaaError

    try:
        spec = json.loads(args.candidates.read_text())
        record = compare(args.engine_dir, args.device, spec.get("faithful", {}), spec.get("candidates", []),
                         args.time_limit, args.all)
    except (OSError, ValueError, SaaError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=_plain) + "\n")
    print(f"wrote {args.out} (first match: {record['first_match']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
