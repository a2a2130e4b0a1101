"""The authors' SAA+ algorithm in PyTorch, step for step, on the same weights the engines hold.

This is what the runtime is measured against (parity tests, latency speed-ups). It
follows the reference code's control flow: GroundingDINO once per caption (once for all of
them with the joined_captions option, which the reference code does not have), boxes
filtered with torch ops, SAM's predictor on the kept boxes, the CNN saliency with a
full sort, rescoring and top-K fusion in numpy. One deliberate difference: where
the reference crashes (no object box), it takes the whole image as the object, as
the runtime does, so the two can be compared on such images.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from runtime.config import PromptConfig

from .detector import reference_caption, reference_detect
from .saliency import reference_multi_saliency, reference_single_saliency
from .segmenter import ReferenceSegmenter


def phrase_from_posmap(posmap: torch.Tensor, input_ids: list[int], tokenizer) -> str:
    """get_phrases_from_posmap of the GroundingDINO SAA+ ships: decode every token marked True."""
    ids = [input_ids[i] for i in posmap.nonzero(as_tuple=True)[0].tolist()]
    return tokenizer.decode(ids)


@dataclass
class ReferenceOutput:
    anomaly_map: np.ndarray
    saliency_map: np.ndarray
    defect_boxes: np.ndarray  # [N,4] pixel xyxy of the boxes sent to SAM, in prompt order
    defect_scores: np.ndarray  # rescored
    object_area: float
    timings_ms: dict[str, float] = field(default_factory=dict)


class ReferenceSAA:
    def __init__(self, gdino, sam, cnn, tokenizer, config: PromptConfig, short_side: int, max_side: int,
                 out_size: int | None = None) -> None:
        self.gdino, self.cnn, self.tokenizer = gdino, cnn, tokenizer
        self.segmenter = ReferenceSegmenter(sam)
        self.config = config
        self.short_side, self.max_side = short_side, max_side
        self.out_size = out_size

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> ReferenceOutput:
        options = self.config.options
        timings: dict[str, float] = {}
        height, width = image.shape[:2]
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        start = time.perf_counter()
        prompts = [(p.text, p.exclude) for p in self.config.all_defect_prompts()]
        found: list = [None] * (1 + len(prompts))  # GroundingDINO's answer per caption, where already run
        if options.joined_captions:
            tick = time.perf_counter()
            found = self._joined_detect(rgb, [self.config.object_caption] + [caption for caption, _ in prompts])
            timings["detector"] = (time.perf_counter() - tick) * 1000
        object_boxes, _, object_area = self._proposals(rgb, [(self.config.object_caption, "PlaceHolder")],
                                                       self.config.object_max_area, height, width, timings, found[:1])
        if object_boxes is None:
            object_area = 1.0
        defect_max_area = float(torch.tensor(object_area, dtype=torch.float32) * self.config.defect_area_ratio)
        defect_boxes, defect_logits, _ = self._proposals(rgb, prompts, defect_max_area, height, width, timings, found[1:])

        tick = time.perf_counter()
        if object_boxes is not None or defect_boxes is not None:
            self.segmenter.set_image(image)  # once per image, as the reference's is_sam_set flag does
        if defect_boxes is not None:
            defect_masks = self.segmenter.predict_boxes(defect_boxes.cpu().numpy())
        else:
            defect_masks = np.zeros((1, height, width), bool)
            defect_logits = [0.0]
        # The reference refines object boxes with SAM even when only their count matters (its cost counts).
        object_masks = self.segmenter.predict_boxes(object_boxes.cpu().numpy()) if object_boxes is not None else None
        multi = self.config.object_count > 1 and object_masks is not None and len(object_masks) > 1
        timings["sam"] = (time.perf_counter() - tick) * 1000

        tick = time.perf_counter()
        if multi:
            saliency = reference_multi_saliency(self.cnn, image, object_masks)
        else:
            saliency = reference_single_saliency(self.cnn, image, n=options.saliency_n or 400,
                                                 mode=options.saliency_mode or "farthest")
        timings["saliency"] = (time.perf_counter() - tick) * 1000

        tick = time.perf_counter()
        scores = []
        for mask, logit in zip(defect_masks, defect_logits):
            inside = saliency[mask]
            scores.append(logit * (1.0 if inside.size == 0 else np.exp(options.rescore_gain * inside.mean())))
        scores = np.stack(scores, axis=0)
        keep = scores.argsort()[-self.config.top_k:]
        anomaly = np.zeros((height, width))
        weight = np.ones((height, width)) if options.fusion_plus_one else np.zeros((height, width))
        for index in keep:
            anomaly += defect_masks[index] * scores[index]
            weight += defect_masks[index] * 1.0
        anomaly[weight > 0] /= weight[weight > 0]
        if self.out_size:
            anomaly = cv2.resize(anomaly, (self.out_size, self.out_size))
            saliency = cv2.resize(saliency, (self.out_size, self.out_size))
        timings["fusion"] = (time.perf_counter() - tick) * 1000
        timings["total"] = (time.perf_counter() - start) * 1000
        boxes = defect_boxes.cpu().numpy() if defect_boxes is not None else np.zeros((0, 4), np.float32)
        return ReferenceOutput(anomaly, saliency, boxes, scores, float(object_area), timings)

    def _joined_detect(self, rgb, captions):
        """The joined_captions option: GroundingDINO once on the captions joined as its multi-phrase
        caption ("a. b. c."), then each caption's (logits over its own tokens, boxes)."""
        normalized = [reference_caption(c) for c in captions]
        lone = [self.tokenizer(c)["input_ids"] for c in normalized]
        joined = " ".join(normalized)
        ids = self.tokenizer(joined)["input_ids"]
        if ids[1:-1] != [t for caption_ids in lone for t in caption_ids[1:-1]] or len(ids) > 256:
            raise ValueError(f"the reference joins captions into one of at most 256 tokens: {joined!r} is not")
        logits, boxes = reference_detect(self.gdino, self.tokenizer, rgb, joined, self.short_side, self.max_side)
        answers, start = [], 1
        for caption_ids in lone:
            stop = start + len(caption_ids) - 2
            answers.append((logits[:, [0, *range(start, stop), len(ids) - 1]], boxes))
            start = stop
        return answers

    def _proposals(self, rgb, prompts, max_area, height, width, timings, found):
        """ensemble_text_guided_mask_proposal without SAM: kept boxes (pixel xyxy), their scores, max box
        area. found: GroundingDINO's answer per prompt where it already ran (joined captions), else None."""
        options = self.config.options
        kept_boxes, kept_logits, max_box_area = [], [], 0.0
        for (caption, exclude), answer in zip(prompts, found):
            if answer is None:
                tick = time.perf_counter()
                answer = reference_detect(self.gdino, self.tokenizer, rgb, caption, self.short_side, self.max_side)
                timings["detector"] = timings.get("detector", 0.0) + (time.perf_counter() - tick) * 1000
            logits, boxes = answer
            logits, boxes = torch.as_tensor(logits), torch.as_tensor(boxes)
            area = boxes[:, 2] * boxes[:, 3]
            keep = (logits.max(dim=1)[0] > options.box_threshold) & (area < max_area) & (area > 0.0)
            if int(keep.sum()) == 0:
                continue
            normalized = caption.lower().strip()
            normalized = normalized if normalized.endswith(".") else normalized + "."
            input_ids = self.tokenizer(normalized)["input_ids"]
            boxes_here, logits_here = [], []
            for logit, box in zip(logits[keep], boxes[keep]):
                phrase = phrase_from_posmap(logit > options.text_threshold, input_ids, self.tokenizer)
                if phrase.count(exclude) > 0:
                    continue
                boxes_here.append(box)
                logits_here.append(logit.max().item())
            if not boxes_here:
                continue
            stacked = torch.stack(boxes_here)
            kept_boxes.append(stacked)
            kept_logits += logits_here
            max_box_area = max(max_box_area, float((stacked[:, 2] * stacked[:, 3]).max()))
        if not kept_boxes:
            return None, None, 1.0
        boxes = torch.cat(kept_boxes) * torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes[:, :2] -= boxes[:, 2:] / 2
        boxes[:, 2:] += boxes[:, :2]
        return boxes, kept_logits, max_box_area
