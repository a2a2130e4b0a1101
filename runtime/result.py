"""What a call of the pipeline returns: the anomaly map, the regions behind it, the decision, and
what the call noticed (notes) and spent (timings)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .stages.regions import Region

RANDOM_WEIGHTS_NOTE = ("random weights: these engines were exported with --random-init (for timing and tests); "
                       "their maps, boxes and scores mean nothing")
JOINED_CAPTIONS_NOTE = ("joined_captions: GroundingDINO ran once on all the captions joined, not once per caption "
                        "as the reference algorithm does")
LITE_NOTE = "lite engines: saliency-only anomaly map (no GroundingDINO/SAM)"


@dataclass
class AnomalyResult:
    anomaly_map: np.ndarray  # float32 [H,W] (image size unless out_size was given)
    saliency_map: np.ndarray  # float32, same size
    regions: list[Region]  # defect regions that passed P^P, with final scores; in_top_k marks the fused ones
    object_regions: list[Region]
    saliency_only: bool
    notes: list[str] = field(default_factory=list)  # e.g. "no object box: whole image used as the object"
    timings_ms: dict[str, float] = field(default_factory=dict)
    engine_ms: dict[str, float] = field(default_factory=dict)  # per stage, the share spent inside onnxruntime runs
    pred_score: float | None = None  # max of the anomaly map at image size (runtime.lineside.decision)
    pred_label: int | None = None  # 1 NG / 0 OK: pred_score > image threshold; None without one
    pred_mask: np.ndarray | None = None  # bool, anomaly_map > pixel threshold; None without one
    stream: dict[str, Any] | None = None  # what the streaming memory did with this part
    image_shape: tuple[int, int] | None = None  # (H, W) of the input: the frame of boxes and mask areas
    random_weights: bool = False  # engines exported with --random-init: the map means nothing
    # The input went through the engines as the reference algorithm takes it (GroundingDINO: the
    # reference's resize, no padding); where not, exact_detector_hw is the detector size that would.
    exact: bool = True
    exact_detector_hw: tuple[int, int] | None = None

    def regions_json(self) -> dict[str, Any]:
        return {
            **({"image_shape": list(self.image_shape)} if self.image_shape is not None else {}),
            "random_weights": self.random_weights,
            "exact": self.exact,
            **({"exact_detector_size": list(self.exact_detector_hw)} if self.exact_detector_hw is not None else {}),
            "pred_score": self.pred_score,
            "pred_label": self.pred_label,
            **({"stream": self.stream} if self.stream is not None else {}),
            "saliency_only": self.saliency_only,
            "notes": self.notes,
            "object_regions": [r.to_json() for r in self.object_regions],
            "regions": [r.to_json() for r in self.regions],
        }
