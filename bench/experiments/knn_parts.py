"""`python -m bench.experiments.knn_parts --engine-dir engines-lite/ --out FILE.json`: where a lite call's time goes.

Times, on the default bottle image with the reference saliency settings and `--threads` CPU
threads: the whole call, the CNN's features, and the one-object kNN's steps (the features'
[P, C] copy by numpy and by OpenCV, the sampled product, the panel products, the numba
selection pass), each the median of `--iters` back-to-back runs. For deciding what to make
faster; the lite target itself is measured by bench.latency against the reference.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "tests" / "data" / "bottle_demo.png"


def median_ms(step: Callable[[], Any], iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return round(float(np.median(times)), 3)


def knn_steps(features: np.ndarray, n: int, iters: int) -> dict[str, float]:
    """The symmetric kNN path of runtime.stages.saliency_kernels, step by step (farthest, self included)."""
    import cv2

    from runtime.stages import saliency_kernels as K

    positions = features.shape[1]
    rows = K.rows_of(features)
    picks = (np.arange(K._SAMPLE, dtype=np.int64) * K._SAMPLE_STEP) % positions
    sampled = np.empty((positions, K._SAMPLE), np.float32)
    offsets, total = K._triangle_layout(positions, K.SYMMETRIC_PANEL_ROWS)
    tri = K._scratch(total)

    def panels() -> None:
        for index, first in enumerate(range(0, positions, K.SYMMETRIC_PANEL_ROWS)):
            last = min(positions, first + K.SYMMETRIC_PANEL_ROWS)
            panel = tri[offsets[index]:offsets[index] + (last - first) * (positions - first)]
            K.gemm_transposed(rows[first:last], rows[first:], panel.reshape(last - first, positions - first))

    capacity = int(min(positions, 2 * (K._sample_rank(n, positions) + 1) / K._SAMPLE * positions + n))
    out, redo = np.zeros(positions, np.float32), np.zeros(positions, np.bool_)
    return {
        "transpose_numpy_ms": median_ms(lambda: np.ascontiguousarray(features.T), iters),
        "transpose_opencv_ms": median_ms(lambda: cv2.transpose(features), iters),
        "sample_product_ms": median_ms(lambda: K.gemm_transposed(rows, np.ascontiguousarray(rows[picks]), sampled), iters),
        "panel_products_ms": median_ms(panels, iters),
        "selection_pass_ms": median_ms(lambda: K._triangle_mean_distance(
            tri, offsets, K.SYMMETRIC_PANEL_ROWS, sampled, n, np.float32(1.0), False, capacity, out, redo), iters),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.knn_parts", description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", type=Path, required=True, help="lite engines")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from bench.latency import set_threads
    from runtime.image_io import read_image
    from runtime.pipeline import Pipeline

    threads = set_threads(args.threads)
    image = read_image(DEFAULT_IMAGE)
    with Pipeline.open(args.engine_dir, dataset="mvtec", category="bottle", threads=args.threads,
                       options={"saliency_preset": "reference"}) as pipeline:
        if not pipeline.saliency_only:
            raise SystemExit("bench.experiments.knn_parts times the lite profile: give lite engines")
        for _ in range(5):
            pipeline(image)
        saliency = pipeline.saliency
        features = saliency.single_object_features(image)
        flat = np.ascontiguousarray(features.reshape(features.shape[0], -1))
        report = {
            "what": __doc__.splitlines()[0].split(": ", 1)[1],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "threads": threads,
            "date": time.strftime("%Y-%m-%d"), "load_average": os.getloadavg(),
            "features_shape": list(flat.shape), "n": saliency.settings.n,
            "call_ms": median_ms(lambda: pipeline(image), args.iters),
            "cnn_features_ms": median_ms(lambda: saliency.single_object_features(image), args.iters),
            **knn_steps(flat, saliency.settings.n, args.iters),
        }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
