"""Calibration: image and pixel thresholds from good parts (and defect examples), and the file
that records them (`python -m runtime.calibrate` writes it).

The pipeline scores every image (pred_score = max of its anomaly map, see runtime.lineside.decision).
How the thresholds are chosen (the file says which rule gave each):
  * image, good parts only: the largest threshold-free choice that rejects at most
    floor(R * n) of the n good parts: the (n - floor(R n))-th smallest good score (R = 0: the
    largest), or midway to the next good score when some are allowed to fail;
  * image, with defects: the threshold of maximum F1 (NG = positive) over good and defect
    scores, midway between neighbouring scores;
  * pixel, with defect masks: the threshold of maximum pixel F1 over all calibration pixels;
  * pixel, good parts only: the image threshold, so a part's mask is non-empty exactly when
    it is NG.
The file also records the images used, their scores, the engines' sha256s, the prompt config
and saliency settings, and the memory; `runtime.infer --calibration` refuses it for any other.
Masks: DIR/masks/<stem>.png, <stem>_mask.png or <stem>.png beside the image; defect where > 127.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from ..errors import ConfigError, ImageError, SaaError
from ..image_io import decode_file, read_image
from .decision import Thresholds, image_score

FORMAT = "saa-calibration"
FORMAT_VERSION = 1
DEFAULT_FALSE_REJECT_RATE = 0.01
MASK_THRESHOLD = 127  # soft-edged masks (MTD, hand-drawn): defect where > 127
MAX_PIXELS = 1 << 24  # pixels pooled for the pixel max-F1; more are strided down (bounded memory)


class CalibrationError(SaaError, ValueError):
    """A calibration file is unreadable or made for other engines, config or memory."""


# ---------------------------------------------------------------- threshold rules


def false_reject_threshold(good_scores: Sequence[float], rate: float) -> tuple[float, str]:
    """The threshold that rejects (score > threshold) at most floor(rate * n) of n good scores."""
    scores = np.sort(np.asarray(good_scores, np.float64))
    if not len(scores):
        raise ConfigError("no good parts to calibrate on")
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"false-reject rate must be in [0, 1), got {rate}")
    allowed = int(math.floor(rate * len(scores) + 1e-9))
    kept = scores[len(scores) - 1 - allowed]
    if allowed == 0:
        return float(kept), f"false-reject rate {rate:g}: the largest of {len(scores)} good scores"
    above = scores[len(scores) - allowed]
    return float((kept + above) / 2.0), (f"false-reject rate {rate:g}: midway between good score "
                                         f"{len(scores) - allowed} and {len(scores) - allowed + 1} of {len(scores)}")


def max_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of `scores > threshold` against boolean `labels`; the threshold
    lies midway between the lowest positive-called score and the next lower one (ties: the higher)."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    positives = int(labels.sum())
    if positives == 0 or len(scores) == 0:
        raise ConfigError("max-F1 needs at least one defect (positive) example")
    order = np.argsort(-scores, kind="stable")
    ordered, hits = scores[order], labels[order]
    tp, fp = np.cumsum(hits), np.cumsum(~hits)
    last = np.r_[ordered[1:] != ordered[:-1], True]  # last index of each run of equal scores
    values, tp, fp = ordered[last], tp[last], fp[last]
    f1 = 2.0 * tp / (tp + fp + positives)
    best = int(np.argmax(f1))  # first maximum: the highest threshold among equals
    if best + 1 < len(values):
        threshold = (values[best] + values[best + 1]) / 2.0
    else:
        threshold = float(np.nextafter(values[best], -np.inf))  # everything called positive
    return float(threshold), float(f1[best])


# ---------------------------------------------------------------- masks


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    values = decode_file(path, cv2.IMREAD_GRAYSCALE)
    if values.shape != shape:
        raise ImageError(f"{path}: mask is {values.shape[1]}x{values.shape[0]}, its image {shape[1]}x{shape[0]}")
    return values > MASK_THRESHOLD


# ---------------------------------------------------------------- what a calibration belongs to


FINGERPRINT_KEYS = ("engines", "profile", "config_sha256", "config_name", "saliency_settings", "memory")
# Options added after calibration files were first written, with the default those files were
# made with: left out of the config hash at that default, so an upgrade keeps the files valid.
LATER_OPTIONS = {"joined_captions": False}


def config_sha256(config: Any) -> str:
    """The prompt config's hash as calibration files record it (runtime.config.PromptConfig)."""
    data = config.to_dict()
    options = data.get("options", {})
    for key, default in LATER_OPTIONS.items():
        if key in options and options[key] == default:
            del options[key]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(pipeline: Any) -> dict[str, Any]:
    """What thresholds depend on: engines, prompt config, saliency settings, memory."""
    memory = getattr(pipeline, "memory", None)
    return {
        "engines": {key: entry.get("sha256") for key, entry in sorted(pipeline.manifest.models.items())},
        "profile": pipeline.manifest.profile,
        "config_sha256": config_sha256(pipeline.config),
        "config_name": pipeline.config.name,
        "saliency_settings": json.loads(json.dumps(asdict(pipeline.saliency.settings), default=str)),
        "memory": None if memory is None else memory.initial_sha256,
    }


@dataclass(frozen=True)
class Calibration:
    path: Path
    data: dict[str, Any]

    @property
    def thresholds(self) -> Thresholds:
        values = self.data["thresholds"]
        return Thresholds(values.get("image"), values.get("pixel")).checked()

    def check(self, pipeline: Any) -> None:
        """Refuse a calibration made for other engines, another config or another memory."""
        if getattr(pipeline, "stream", None) is not None:
            raise CalibrationError(f"{self.path}: a calibration holds for a fixed memory, but a streaming memory changes "
                                   "the scores as it learns: set --image-threshold/--pixel-threshold instead")
        made, now = self.data["fingerprint"], fingerprint(pipeline)
        if made["engines"] != now["engines"]:
            changed = sorted(k for k in set(made["engines"]) | set(now["engines"])
                             if made["engines"].get(k) != now["engines"].get(k))
            raise CalibrationError(f"{self.path} was made for other engines ({', '.join(changed)} differ from "
                                   f"{pipeline.manifest.engine_dir}): run runtime.calibrate again with these engines")
        if made["config_sha256"] != now["config_sha256"]:
            raise CalibrationError(f"{self.path} was made for another prompt config ({made['config_name']!r}, or "
                                   f"other options) than this one ({now['config_name']!r}): calibrate again")
        if made["saliency_settings"] != now["saliency_settings"]:
            raise CalibrationError(f"{self.path} was made with other saliency settings: calibrate again")
        if made["memory"] != now["memory"]:
            had = "no memory" if made["memory"] is None else f"memory {made['memory'][:12]}"
            has = "none" if now["memory"] is None else f"memory {now['memory'][:12]}"
            raise CalibrationError(f"{self.path} was made with {had}, this pipeline has {has}: pass the same "
                                   f"--memory or calibrate again")


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CalibrationError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CalibrationError(f"{path}: not a calibration file written by runtime.calibrate")
    if data.get("format_version") != FORMAT_VERSION:
        raise CalibrationError(f"{path}: calibration format {data.get('format_version')!r}, this runtime reads "
                               f"{FORMAT_VERSION}: calibrate again")
    if not isinstance(data.get("thresholds"), dict) or not isinstance(data.get("fingerprint"), dict):
        raise CalibrationError(f"{path}: calibration file lacks thresholds or fingerprint")
    made = data["fingerprint"]
    if not isinstance(made.get("engines"), dict) or not all(key in made for key in FINGERPRINT_KEYS):
        missing = [key for key in FINGERPRINT_KEYS if key not in made] or ["engines (an object)"]
        raise CalibrationError(f"{path}: the fingerprint lacks {', '.join(missing)}: the file was edited or "
                               "damaged (calibrate again)")
    calibration = Calibration(path, data)
    try:
        calibration.thresholds
    except ConfigError as err:
        raise CalibrationError(f"{path}: {err}") from None
    return calibration


# ---------------------------------------------------------------- calibrating


class _PixelPool:
    """Map values and mask labels of the calibration images, strided when there are too many."""

    def __init__(self) -> None:
        self.values: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add(self, values: np.ndarray, labels: np.ndarray) -> None:
        self.values.append(values.astype(np.float32).ravel())
        self.labels.append(labels.ravel())

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        total = sum(len(v) for v in self.values)
        step = max(1, -(-total // MAX_PIXELS))
        return (np.concatenate([v[::step] for v in self.values]), np.concatenate([l[::step] for l in self.labels]))


def calibrate(pipeline: Any, good: Sequence[tuple[Path, Path | None]],
              defects: Sequence[tuple[Path, Path | None]] = (), false_reject_rate: float = DEFAULT_FALSE_REJECT_RATE,
              image_rule: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Run the pipeline over the parts and return the calibration record (see the module doc)."""
    if image_rule not in ("auto", "false-reject", "max-f1"):
        raise ConfigError(f"image rule must be auto, false-reject or max-f1, got {image_rule!r}")
    if not good:
        raise ConfigError("no good parts to calibrate on")
    if image_rule == "max-f1" and not defects:
        raise ConfigError("the max-f1 image rule needs --defects")
    pool = _PixelPool()
    scores: dict[str, list[float]] = {"good": [], "defects": []}
    masked = 0
    for kind, parts in (("good", good), ("defects", defects)):
        for path, mask_path in parts:
            image = read_image(path)
            result = pipeline(image)
            scores[kind].append(image_score(result.anomaly_map))
            if kind == "good":
                pool.add(result.anomaly_map, np.zeros(result.anomaly_map.shape, bool))
            elif mask_path is not None:
                pool.add(result.anomaly_map, read_mask(mask_path, image.shape[:2]))
                masked += 1
            if progress:
                print(f"{kind} {path.name}: score {scores[kind][-1]:.5f}", file=sys.stderr)

    good_scores = np.array(scores["good"])
    defect_scores = np.array(scores["defects"])
    rule = image_rule if image_rule != "auto" else ("max-f1" if defects else "false-reject")
    measured: dict[str, Any] = {}
    if rule == "max-f1":
        all_scores = np.concatenate([good_scores, defect_scores])
        labels = np.r_[np.zeros(len(good_scores), bool), np.ones(len(defect_scores), bool)]
        image_threshold, f1 = max_f1_threshold(all_scores, labels)
        image_how = f"max image F1 ({f1:.4f}) over {len(good_scores)} good and {len(defect_scores)} defect parts"
        measured["image_f1"] = f1
    else:
        image_threshold, image_how = false_reject_threshold(good_scores, false_reject_rate)
    if masked:
        values, labels = pool.arrays()
        if not labels.any():
            raise ConfigError(f"the {masked} defect masks given mark no pixel as defect (none above "
                              f"{MASK_THRESHOLD}): save defect pixels as 255 on 0")
        pixel_threshold, pixel_f1 = max_f1_threshold(values, labels)
        pixel_how = f"max pixel F1 ({pixel_f1:.4f}) over {len(good_scores)} good and {masked} masked defect parts"
        measured["pixel_f1"] = pixel_f1
    else:
        pixel_threshold, pixel_how = image_threshold, "the image threshold (no defect masks given)"
    measured["good_rejected"] = int((good_scores > image_threshold).sum())
    measured["good"] = len(good_scores)
    if len(defect_scores):
        measured["defects_caught"] = int((defect_scores > image_threshold).sum())
        measured["defects"] = len(defect_scores)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "thresholds": {"image": image_threshold, "pixel": pixel_threshold},
        "rules": {"image": image_how, "pixel": pixel_how, "score": "pred_score = max of the anomaly map",
                  "label": "NG when pred_score > image threshold", "mask": "anomaly map > pixel threshold"},
        "false_reject_rate": false_reject_rate if rule == "false-reject" else None,
        "measured": measured,
        "fingerprint": fingerprint(pipeline),
        "engine_dir": str(pipeline.manifest.engine_dir),
        "images": {"good": [str(p) for p, _ in good], "defects": [str(p) for p, _ in defects]},
        "scores": {"good": scores["good"], "defects": scores["defects"]},
    }
