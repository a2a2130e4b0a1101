"""Each image's output files, and the stems that name them.

<stem>_map.npy (exact), <stem>_map.png (16-bit, scaled by the JSON's png_max), <stem>_overlay.png,
<stem>_regions.json, and <stem>_mask.png where a pixel threshold is set.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..image_io import write_bytes, write_image
from ..result import AnomalyResult
from .overlay import overlay


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
