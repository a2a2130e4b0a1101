"""Line-side decisions: an image score, an OK/NG label and a defect mask from plain thresholds.

pred_score = the maximum of the anomaly map: the image score of the evaluation protocol
(bench.evaluate ranks images by the max of their map), so a threshold on it is a point on
the image ROC docs/line-side.md reports.
pred_label = 1 (NG, anomalous) when pred_score > the image threshold, else 0 (OK).
pred_mask  = anomaly map > the pixel threshold (bool, the map's size).

Thresholds are runtime settings in the map's own units (CLI flags, calibration file, API
and C ABI fields); no engine holds them. Without a threshold its output is None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class Thresholds:
    image: float | None = None  # pred_label = pred_score > image
    pixel: float | None = None  # pred_mask = anomaly_map > pixel

    def checked(self) -> "Thresholds":
        for name in ("image", "pixel"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(float(value)):
                raise ConfigError(f"{name} threshold must be a finite number or unset, got {value!r}")
        return Thresholds(_as_float(self.image), _as_float(self.pixel))

    def to_json(self) -> dict[str, float | None]:
        return {"image": self.image, "pixel": self.pixel}


def _as_float(value: float | None) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Decision:
    pred_score: float
    pred_label: int | None  # 1: NG (anomalous), 0: OK, None: no image threshold
    pred_mask: np.ndarray | None  # bool [H, W], None: no pixel threshold


def image_score(anomaly_map: np.ndarray) -> float:
    """The image's anomaly score: the max of its map (the evaluation protocol's image score)."""
    values = np.asarray(anomaly_map)
    if values.size == 0:
        raise ValueError("the anomaly map is empty: no image score")
    return float(values.max())


def decide(anomaly_map: np.ndarray, thresholds: Thresholds, score: float | None = None) -> Decision:
    """pred_score (given, or the map's max), pred_label and pred_mask from `thresholds`."""
    score = image_score(anomaly_map) if score is None else float(score)
    label = None if thresholds.image is None else int(score > thresholds.image)
    mask = None if thresholds.pixel is None else np.asarray(anomaly_map) > thresholds.pixel
    return Decision(score, label, mask)


__all__ = ["Decision", "Thresholds", "decide", "image_score"]
