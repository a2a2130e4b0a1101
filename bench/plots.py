"""Pictures of an evaluation: a case grid (image / ground truth / anomaly map / saliency) and the pixel
precision-recall curve with its max-F1 point. Matplotlib's Agg canvas is used directly (no pyplot), so
importing this module changes no global backend."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_CURVE_POINTS = 4000  # a 2^18-bin curve is far denser than a picture can show


@dataclass
class Case:
    title: str
    image_bgr: np.ndarray  # uint8 HxWx3
    gt: np.ndarray  # bool HxW
    anomaly: np.ndarray  # normalised to [0, 1]
    saliency: np.ndarray | None  # normalised to [0, 1]; None: the predictor gave none


def plot_cases(cases: list[Case], path: Path, title: str = "") -> Path:
    """One row per case: image, ground truth, anomaly map, saliency map (jet, fixed 0..1 scale)."""
    rows = max(len(cases), 1)
    figure = Figure(figsize=(10, 2.6 * rows), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 4, squeeze=False)
    for row, case in zip(axes, cases):
        row[0].imshow(case.image_bgr[:, :, ::-1])
        row[0].set_title(case.title, fontsize=8, loc="left")
        row[1].imshow(case.gt, cmap="gray", vmin=0, vmax=1)
        row[2].imshow(case.anomaly, cmap="jet", vmin=0, vmax=1)
        if case.saliency is not None:
            row[3].imshow(case.saliency, cmap="jet", vmin=0, vmax=1)
    for column, name in enumerate(("image", "ground truth", "anomaly map", "saliency map")):
        axes[-1][column].set_xlabel(name, fontsize=9)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.25 / (2.6 * rows)))  # leave the suptitle its line
    figure.savefig(path)
    return Path(path)


def plot_pr_curve(precision: np.ndarray, recall: np.ndarray, best: int, path: Path, title: str = "") -> Path:
    """Precision against recall; `best` indexes the max-F1 point (-1: none to mark)."""
    figure = Figure(figsize=(5, 4.5), dpi=80)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    step = max(1, len(recall) // MAX_CURVE_POINTS)
    axis.plot(recall[::step], precision[::step], lw=1.5)
    if 0 <= best < len(recall):
        p, r = float(precision[best]), float(recall[best])
        f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
        axis.plot([r], [p], "o", color="tab:red", label=f"max F1 {100 * f1:.2f} (P {p:.2f}, R {r:.2f})")
        axis.legend(loc="upper right", fontsize=8)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    axis.grid(alpha=0.3)
    if title:
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)
