"""SAM box refinement exactly as the authors' SAA/model.py calls it (PyTorch).

The reference builds SamPredictor(sam), calls set_image(image) once per image (with
the BGR array, passed as if RGB), maps the xyxy boxes with
transform.apply_boxes_torch(boxes, (H, W)) and calls predict_torch(boxes=...,
multimask_output=False); the masks are [N, 1, H, W] bool, squeezed to [N, H, W].
"""
from __future__ import annotations

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam


class ReferenceSegmenter:
    """set_image() once, predict_boxes() per box set: the reference's region_refine."""

    def __init__(self, sam: Sam) -> None:
        self.predictor = SamPredictor(sam.eval())

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)

    @torch.no_grad()
    def predict_boxes(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """[N, 4] xyxy boxes in original pixels -> bool masks [N, H, W].

        N = 0 returns an empty [0, H, W] array: the reference never calls SAM without boxes.
        """
        height, width = self.predictor.original_size
        boxes = torch.as_tensor(np.asarray(boxes_xyxy), dtype=torch.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros((0, height, width), dtype=bool)
        transformed = self.predictor.transform.apply_boxes_torch(boxes, (height, width)).to(self.predictor.device)
        masks, _, _ = self.predictor.predict_torch(
            point_coords=None, point_labels=None, boxes=transformed, multimask_output=False
        )
        return masks.cpu().squeeze(1).numpy()


def reference_masks(sam: Sam, image: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
    """The reference's masks for `boxes_xyxy` on `image` (uint8 HxWx3, channel order as given)."""
    segmenter = ReferenceSegmenter(sam)
    segmenter.set_image(image)
    return segmenter.predict_boxes(boxes_xyxy)
