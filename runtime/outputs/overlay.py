"""The overlay picture of one result: heat map over the image, fused regions' boxes, the verdict.

Text is sized to the image (camera frames run from 100-pixel MTD tiles to 8000-pixel line scans),
moved left where it would run off the right edge and shrunk where it is wider than the image.
"""
from __future__ import annotations

import cv2
import numpy as np

from ..pipeline import AnomalyResult

FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE = (255, 255, 255)


def text_scale(image_shape: tuple[int, ...]) -> float:
    """Font scale for an image: 0.45 at 600 pixels on the shorter side, in proportion, within [0.3, 4]."""
    return float(np.clip(0.45 * min(image_shape[:2]) / 600.0, 0.3, 4.0))


BLACK = (0, 0, 0)
Rect = tuple[int, int, int, int]  # x0, y0, x1, y1


def _fit(picture_width: int, text: str, scale: float) -> tuple[float, int, int, int, int]:
    """(scale, thickness, width, height, baseline) of a line of text, shrunk (down to a third of
    `scale`) where it is wider than the picture."""
    thickness = max(1, int(round(scale * 2)))
    room = picture_width - 4
    (width, height), baseline = cv2.getTextSize(text, FONT, scale, thickness)
    if width > room > 0:
        scale = max(scale * room / width, scale / 3)
        thickness = max(1, int(round(scale * 2)))
        (width, height), baseline = cv2.getTextSize(text, FONT, scale, thickness)
    return scale, thickness, width, height, baseline


def _layout(picture_shape: tuple[int, ...], text: str, origin: tuple[int, int], scale: float) -> tuple[float, int, Rect]:
    """(scale, thickness, strip) of `text` at `origin` (baseline left): shrunk to fit, moved left
    where the line would run off the right edge."""
    scale, thickness, width, height, baseline = _fit(picture_shape[1], text, scale)
    x = max(0, min(origin[0], picture_shape[1] - 2 - width))
    return scale, thickness, (x - 1, origin[1] - height - 1, x + width + 1, origin[1] + baseline + 1)


def text_rect(picture_shape: tuple[int, ...], text: str, origin: tuple[int, int], scale: float) -> Rect:
    """Where put_text draws `text` at `origin` (baseline left), its strip included."""
    return _layout(picture_shape, text, origin, scale)[2]


def put_text(picture: np.ndarray, text: str, origin: tuple[int, int], scale: float) -> None:
    """White text on a black strip (readable on any colour of the heat map) at origin, moved left
    where the line would run off the right edge and shrunk where it is wider than the picture."""
    scale, thickness, (x0, y0, x1, y1) = _layout(picture.shape, text, origin, scale)
    cv2.rectangle(picture, (x0, y0), (x1, y1), BLACK, cv2.FILLED)
    cv2.putText(picture, text, (x0 + 1, origin[1]), FONT, scale, WHITE, thickness, cv2.LINE_AA)


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def label_origins(picture_shape: tuple[int, ...], labels: list[tuple[str, Rect]], scale: float,
                  taken: list[Rect] | None = None) -> list[tuple[int, int]]:
    """Baseline origins for box labels that do not cover each other (or the `taken` rects): each
    goes just above its box, else further up in steps of a line, else below the box, further
    down. Regions often share a box (one per prompt that found it): their labels stack."""
    placed = list(taken or [])
    origins = []
    top = int(22 * scale)
    for text, (x0, y0, _, y1) in labels:
        line = text_rect(picture_shape, text, (0, 100), scale)
        step = line[3] - line[1] + 2
        above = [max(y0 - 3, top) - i * step for i in range(8)]
        below = [y1 + step + i * step for i in range(8)]
        candidates = [y for y in above if y >= top] + [y for y in below if y < picture_shape[0]]
        origin = (max(x0, 0), candidates[0] if candidates else max(y0 - 3, top))
        for y in candidates:
            if not any(_overlaps(text_rect(picture_shape, text, (max(x0, 0), y), scale), rect) for rect in placed):
                origin = (max(x0, 0), y)
                break
        placed.append(text_rect(picture_shape, text, origin, scale))
        origins.append(origin)
    return origins


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
    label = "saliency only (lite)" if result.saliency_only else f"max {values.max():.3f}"
    if result.random_weights:
        label = f"RANDOM WEIGHTS, {label}"
    if result.pred_label is not None:
        label = f"{'NG' if result.pred_label else 'OK'} {result.pred_score:.3f}, {label}"
    title_origin = (4, int(round(30 * scale)))
    boxes = []
    for region in result.regions:
        if region.in_top_k:
            x0, y0, x1, y1 = (int(round(v)) for v in region.box)
            cv2.rectangle(picture, (x0, y0), (x1, y1), WHITE, line)
            # the phrase GroundingDINO found; its prompt where no token passed the text threshold
            name = (region.phrase or region.prompt)[:20]
            boxes.append((f"{name} {region.score:.2f}", (x0, y0, x1, y1)))
    origins = label_origins(picture.shape, boxes, scale * 0.9, [text_rect(picture.shape, label, title_origin, scale)])
    for (text, _), origin in zip(boxes, origins):
        put_text(picture, text, origin, scale * 0.9)
    put_text(picture, label, title_origin, scale)
    return picture
