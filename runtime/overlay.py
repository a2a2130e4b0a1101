"""The overlay picture of one result: heat map over the image, fused regions' boxes, the verdict.

Text is sized to the image (camera frames run from 100-pixel MTD tiles to 8000-pixel line scans),
moved left where it would run off the right edge and shrunk where it is wider than the image.
"""
from __future__ import annotations

import cv2
import numpy as np

from .pipeline import AnomalyResult

FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE = (255, 255, 255)


def text_scale(image_shape: tuple[int, ...]) -> float:
    """Font scale for an image: 0.45 at 600 pixels on the shorter side, in proportion, within [0.3, 4]."""
    return float(np.clip(0.45 * min(image_shape[:2]) / 600.0, 0.3, 4.0))


def put_text(picture: np.ndarray, text: str, origin: tuple[int, int], scale: float) -> None:
    """cv2.putText at origin, moved left where the line would run off the right edge, and shrunk
    (down to a third of `scale`) where it is wider than the picture."""
    thickness = max(1, int(round(scale * 2)))
    room = picture.shape[1] - 4
    width = cv2.getTextSize(text, FONT, scale, thickness)[0][0]
    if width > room > 0:
        scale = max(scale * room / width, scale / 3)
        thickness = max(1, int(round(scale * 2)))
        width = cv2.getTextSize(text, FONT, scale, thickness)[0][0]
    x = max(0, min(origin[0], picture.shape[1] - 2 - width))
    cv2.putText(picture, text, (x, origin[1]), FONT, scale, WHITE, thickness, cv2.LINE_AA)


def overlay(image: np.ndarray, values: np.ndarray, result: AnomalyResult) -> np.ndarray:
    """Heat map over the image, with the fused regions' boxes and scores, for a person to look at."""
    if values.shape != image.shape[:2]:
        values = cv2.resize(values, (image.shape[1], image.shape[0]))
    # Saliency-only maps have no meaningful zero (distances): show their range. Fused maps start at 0.
    low = float(values.min()) if result.saliency_only else 0.0
    span = max(float(values.max()) - low, 1e-6)
    heat = cv2.applyColorMap(np.uint8(np.clip((values - low) / span, 0, 1) * 255), cv2.COLORMAP_JET)
    picture = cv2.addWeighted(image, 0.55, heat, 0.45, 0)
    scale = text_scale(image.shape)
    line = max(1, int(round(scale * 2)))
    for region in result.regions:
        if not region.in_top_k:
            continue
        x0, y0, x1, y1 = (int(round(v)) for v in region.box)
        cv2.rectangle(picture, (x0, y0), (x1, y1), WHITE, line)
        put_text(picture, f"{region.phrase[:20]} {region.score:.2f}", (max(x0, 0), max(y0 - 3, int(22 * scale))),
                 scale * 0.9)
    label = "saliency only (lite)" if result.saliency_only else f"max {values.max():.3f}"
    if result.random_weights:
        label = f"RANDOM WEIGHTS, {label}"
    if result.pred_label is not None:
        label = f"{'NG' if result.pred_label else 'OK'} {result.pred_score:.3f}, {label}"
    put_text(picture, label, (4, int(round(30 * scale))), scale)
    return picture
