"""The authors' saliency (P^S) in PyTorch: ModelINet + single_object_similarity + the multi-instance branch.

Takes the export's SaliencyCNN but uses only its timm backbone (`cnn.backbone`) and
does ModelINet's own steps here (PIL resize to the longest side, mean/std on the
0..255 scale, padding, nearest upsampling, concat, normalise), so a test against
this reference also checks the exported wrapper. The similarity and the full
descending sort follow SAA/model.py line for line; the multi-instance branch is
the same computation with its per-pixel Python loops written as tensor indexing
(same row-major order, same zeroing of the object's own positions).
Where the authors' code crashes (one object only, a mask empty on the grid) this
raises ValueError saying so.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import resize, to_pil_image

from runtime.manifest import IMAGENET_MEAN, IMAGENET_STD, SALIENCY_MULTI_SIZE, SALIENCY_SINGLE_SIZE, SALIENCY_STRIDE


def _longest_side_shape(height: int, width: int, length: int) -> tuple[int, int]:
    scale = length * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@torch.no_grad()
def modelinet_features(cnn: torch.nn.Module, image: np.ndarray, img_size: int) -> torch.Tensor:
    """ModelINet.forward on a uint8 HxWx3 array: [1, C, h, w] unit features."""
    backbone = cnn.backbone if hasattr(cnn, "backbone") else cnn
    target = _longest_side_shape(image.shape[0], image.shape[1], img_size)
    resized = np.array(resize(to_pil_image(image), list(target)))  # ResizeLongestSide.apply_image
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None, :, :, :]
    mean = torch.tensor([m * 255 for m in IMAGENET_MEAN]).view(-1, 1, 1)
    std = torch.tensor([s * 255 for s in IMAGENET_STD]).view(-1, 1, 1)
    x = (x - mean) / std
    h, w = x.shape[-2:]
    x = F.pad(x, (0, img_size - w, 0, img_size - h))
    features = list(backbone(x))
    size_0 = features[0].shape[2:]
    for i in range(1, len(features)):
        features[i] = F.interpolate(features[i], size_0)
    return F.normalize(torch.cat(features, dim=1), dim=1)


@torch.no_grad()
def reference_single_grid(
    cnn: torch.nn.Module, image: np.ndarray, n: int = 400, mode: str = "farthest", exclude_self: bool | None = None
) -> np.ndarray:
    """single_object_similarity before its final resize: [64, 64] float32 at the default 256 input.

    mode "farthest" is the authors' code (full descending sort, self included); "nearest"
    is the paper's equation (ascending sort, self excluded unless exclude_self=False).
    """
    if mode not in ("farthest", "nearest"):
        raise ValueError(f"mode must be 'farthest' or 'nearest', got {mode!r}")
    if exclude_self is None:
        exclude_self = mode == "nearest"
    resize_image = cv2.resize(image, (SALIENCY_SINGLE_SIZE, SALIENCY_SINGLE_SIZE))
    features = modelinet_features(cnn, resize_image, SALIENCY_SINGLE_SIZE)
    B, C, H, W = features.shape
    assert B == 1
    features_flattern = features.view(B * C, H * W)
    features_self_similarity = features_flattern.T @ features_flattern
    features_self_similarity = 0.5 * (1 - features_self_similarity)
    if exclude_self:
        keep = ~torch.eye(H * W, dtype=torch.bool)
        features_self_similarity = features_self_similarity[keep].view(H * W, H * W - 1)
    features_self_similarity = features_self_similarity.sort(dim=1, descending=(mode == "farthest"))[0]
    features_self_similarity = torch.mean(features_self_similarity[:, :n], dim=1)
    return features_self_similarity.view(H, W).cpu().numpy()


def reference_single_saliency(
    cnn: torch.nn.Module, image: np.ndarray, n: int = 400, mode: str = "farthest", exclude_self: bool | None = None
) -> np.ndarray:
    """The authors' single_object_similarity: float32 map at image size."""
    heat = reference_single_grid(cnn, image, n, mode, exclude_self)
    return cv2.resize(heat, (image.shape[1], image.shape[0]))


@torch.no_grad()
def reference_multi_grid(cnn: torch.nn.Module, image: np.ndarray, object_masks: np.ndarray) -> np.ndarray:
    """The multi-instance branch of visual_saliency_calculation before its final resize (float64 grid)."""
    # The authors' code fails at these two checks only after the CNN ran; failing first is cheaper.
    feature_size = (SALIENCY_MULTI_SIZE // SALIENCY_STRIDE,) * 2
    object_masks_clone = np.asarray(object_masks).copy().astype(np.int32)
    resize_object_masks = [
        cv2.resize(m, feature_size, interpolation=cv2.INTER_NEAREST) for m in object_masks_clone
    ]
    if len(resize_object_masks) < 2:
        raise ValueError("the reference crashes with fewer than two object masks (torch.cat of an empty list)")
    if any(not (m > 0).any() for m in resize_object_masks):
        raise ValueError("the reference crashes on an object mask that is empty on the feature grid (np.stack of [])")
    resize_image = cv2.resize(image, (SALIENCY_MULTI_SIZE, SALIENCY_MULTI_SIZE))
    features = modelinet_features(cnn, resize_image, SALIENCY_MULTI_SIZE)
    if tuple(features.shape[2:]) != feature_size:
        raise ValueError(f"features {tuple(features.shape)} are not on the stride-{SALIENCY_STRIDE} grid")

    mask_anomaly_scores = []
    for indx in range(len(resize_object_masks)):
        other_object_masks = resize_object_masks[:indx] + resize_object_masks[indx + 1:]
        one_mask_feature, one_feature_location, other_mask_features = _region_feature_extraction(
            features, resize_object_masks[indx], other_object_masks
        )
        similarity = one_mask_feature @ other_mask_features.T
        similarity = similarity.max(dim=1)[0]
        anomaly_score = (0.5 * (1.0 - similarity)).cpu().numpy()
        mask_anomaly_score = np.zeros(tuple(feature_size))
        mask_anomaly_score[one_feature_location[:, 0], one_feature_location[:, 1]] = anomaly_score
        mask_anomaly_scores.append(mask_anomaly_score)
    return np.max(np.stack(mask_anomaly_scores, axis=0), axis=0)


def _region_feature_extraction(features: torch.Tensor, one_object_mask: np.ndarray, other_object_masks: list):
    """region_feature_extraction: the object's features (row-major), then the others' with the object zeroed."""
    features_clone = features.clone()
    location = np.argwhere(one_object_mask > 0)  # the (h, w) double loop's order
    rows, cols = torch.as_tensor(location[:, 0]), torch.as_tensor(location[:, 1])
    one_mask_feature = features_clone[0, :, rows, cols].T.clone()  # [n, C]
    features_clone[:, :, rows, cols] = 0.0
    B, C, H, W = features_clone.shape
    assert B == 1
    features_clone_flattern = features_clone.view(C, -1)
    other_mask_features = [features_clone_flattern[:, torch.as_tensor(m.reshape(-1) > 0)] for m in other_object_masks]
    other_mask_features = torch.cat(other_mask_features, dim=1).T
    if other_mask_features.shape[0] == 0:
        raise ValueError("the reference crashes when the other objects have no position on the grid (max of [])")
    return one_mask_feature, location, other_mask_features


def reference_multi_saliency(cnn: torch.nn.Module, image: np.ndarray, object_masks: np.ndarray) -> np.ndarray:
    """The authors' multi-instance saliency: float64 map at image size (as their code returns it)."""
    grid = reference_multi_grid(cnn, image, object_masks)
    return cv2.resize(grid, (image.shape[1], image.shape[0]))


__all__ = [
    "modelinet_features",
    "reference_multi_grid",
    "reference_multi_saliency",
    "reference_single_grid",
    "reference_single_saliency",
]
