"""Test-set listings for MVTec AD, VisA, MTD and a plain images+masks folder.

Each layout becomes {category: [Sample, ...]}; nothing is read but file names,
except the folder layout, whose labels come from its masks. Masks are read
later, with `read_mask`, binarised by the threshold their dataset needs:
MVTec and VisA store 0/255 or small label values (any non-zero pixel is a
defect, as the reference and VisA's own split script do); MTD's masks have
soft edges and user masks may too (defect: > 127).
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from runtime.errors import SaaError
from runtime.image_io import IMAGE_SUFFIXES, decode_file

DATASETS = ("mvtec", "visa", "mtd", "folder")
MTD_CATEGORY = "mtd"  # the whole MTD set is one category, as runtime/data/prompts/mtd.json
GOOD = "good"
SOFT_MASK_THRESHOLD = 127
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"


class DatasetError(SaaError, ValueError):
    """The dataset root is missing or not in the layout the chosen dataset has."""


@dataclass(frozen=True)
class Sample:
    image_path: Path
    mask_path: Path | None  # None: no defect pixels
    label: int  # 1 anomalous, 0 good
    defect_type: str  # "good" for normal images
    mask_threshold: int = 0  # a mask pixel is a defect where its value > mask_threshold

    @property
    def name(self) -> str:
        return f"{self.defect_type}/{self.image_path.stem}"


def list_samples(dataset: str, root: Path, categories: list[str] | None = None) -> dict[str, list[Sample]]:
    """The test samples of each (selected) category of `dataset` under `root`, sorted by path."""
    root = Path(root)
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root is not a folder")
    listed = {"mvtec": _list_mvtec, "visa": _list_visa, "mtd": _list_mtd, "folder": _list_folder}[dataset](
        root, categories)
    for category, samples in listed.items():
        if not samples:
            raise DatasetError(f"{root}: category {category!r} has no test images")
    return listed


def read_mask(sample: Sample, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean defect mask of a sample (all False without a mask file); `shape` (H, W) is checked if given."""
    if sample.mask_path is None:
        if shape is None:
            raise ValueError(f"{sample.image_path}: no mask file, so the image shape is needed")
        return np.zeros(shape, bool)
    values = decode_file(sample.mask_path, cv2.IMREAD_GRAYSCALE)
    if shape is not None and values.shape != tuple(shape):
        raise DatasetError(f"{sample.mask_path}: mask is {values.shape[1]}x{values.shape[0]} but its image "
                           f"{sample.image_path.name} is {shape[1]}x{shape[0]}")
    mask = values > sample.mask_threshold
    if sample.mask_threshold > 0 and not mask.any() and values.any():
        raise DatasetError(f"{sample.mask_path}: mask values only reach {values.max()}, none above "
                           f"{sample.mask_threshold}; save defect pixels as 255 (0/255 masks)")
    return mask


def subsample(samples: list[Sample], limit: int | None, seed: int = 0) -> list[Sample]:
    """At most `limit` samples drawn with `seed`, keeping the good/anomalous proportion (and one of each
    when both exist and limit >= 2); order as in the input."""
    if limit is None or limit >= len(samples):
        return list(samples)
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    rng = np.random.default_rng(seed)
    anomalous = [i for i, s in enumerate(samples) if s.label]
    good = [i for i, s in enumerate(samples) if not s.label]
    n_anomalous = round(limit * len(anomalous) / len(samples))
    if anomalous and good and limit >= 2:
        n_anomalous = min(max(n_anomalous, 1), limit - 1)
    n_anomalous = min(n_anomalous, len(anomalous))
    n_good = min(limit - n_anomalous, len(good))
    chosen = list(rng.choice(anomalous, n_anomalous, replace=False)) + list(rng.choice(good, n_good, replace=False))
    return [samples[i] for i in sorted(chosen)]


# ---- layouts -------------------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _select(found: list[str], wanted: list[str] | None, root: Path, what: str) -> list[str]:
    if not wanted:
        return found
    unknown = [c for c in wanted if c not in found]
    if unknown:
        raise DatasetError(f"{root}: no {what} {', '.join(map(repr, unknown))}; found: {', '.join(found)}")
    return list(dict.fromkeys(wanted))


def _list_mvtec(root: Path, categories: list[str] | None) -> dict[str, list[Sample]]:
    """root/<cat>/test/<type>/*.png, masks root/<cat>/ground_truth/<type>/<name>_mask.png.

    Also reads VisA converted by its split script (VisA_pytorch/1cls: masks named <name>.png)."""
    if (root / "test").is_dir() and (root / "ground_truth").is_dir():
        raise DatasetError(f"{root}: this is one category's folder; pass its parent as the root and "
                           f"--category {root.name}")
    found = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not found:
        raise DatasetError(f"{root}: no <category>/test folders; expected the MVTec AD layout "
                           "root/<category>/test/<type>/*.png with masks in <category>/ground_truth/<type>/")
    listed = {}
    for category in _select(found, categories, root, "category"):
        samples = []
        test = root / category / "test"
        for type_dir in sorted(p for p in test.iterdir() if p.is_dir()):
            for image in _images_in(type_dir):
                if type_dir.name == GOOD:
                    samples.append(Sample(image, None, 0, GOOD))
                    continue
                masks = root / category / "ground_truth" / type_dir.name
                candidates = [masks / f"{image.stem}_mask.png", masks / f"{image.stem}.png"]
                mask = next((m for m in candidates if m.is_file()), None)
                if mask is None:
                    raise DatasetError(f"{image}: no ground-truth mask (looked for {candidates[0]})")
                samples.append(Sample(image, mask, 1, type_dir.name))
        listed[category] = samples
    return listed


def _list_visa(root: Path, categories: list[str] | None) -> dict[str, list[Sample]]:
    """VisA as downloaded: split_csv/1cls.csv (its test rows), else <cat>/Data/Images/{Normal,Anomaly} (all
    images, no split), else the MVTec-like layout its split script writes."""
    if (root / VISA_SPLIT_CSV).is_file():
        return _list_visa_csv(root, categories)
    raw = sorted(p.name for p in root.iterdir() if (p / "Data" / "Images").is_dir())
    if raw:
        print(f"warning: {root / VISA_SPLIT_CSV} not found: every image of each class is a test image",
              file=sys.stderr)
        return {c: _list_visa_raw(root / c) for c in _select(raw, categories, root, "class")}
    if any((p / "test").is_dir() for p in root.iterdir()):
        return _list_mvtec(root, categories)
    raise DatasetError(f"{root}: not a VisA layout; expected {VISA_SPLIT_CSV} (the download's split), "
                       "<class>/Data/Images/{Normal,Anomaly} with <class>/Data/Masks/Anomaly, or <class>/test/")


def _list_visa_csv(root: Path, categories: list[str] | None) -> dict[str, list[Sample]]:
    path = root / VISA_SPLIT_CSV
    by_category: dict[str, list[Sample]] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        needed = {"object", "split", "label", "image", "mask"}
        if not needed <= set(reader.fieldnames or ()):
            raise DatasetError(f"{path}: expected columns {', '.join(sorted(needed))}, got {reader.fieldnames}")
        for row in reader:
            if row["split"] != "test":
                continue
            image = root / row["image"]
            anomalous = row["label"] != "normal"
            mask = root / row["mask"] if anomalous and row["mask"] else None
            for file in (image, mask):
                if file is not None and not file.is_file():
                    raise DatasetError(f"{path}: lists {file}, which does not exist")
            if anomalous and mask is None:
                raise DatasetError(f"{path}: anomalous test image {row['image']} has no mask")
            by_category.setdefault(row["object"], []).append(
                Sample(image, mask, int(anomalous), "anomaly" if anomalous else GOOD))
    chosen = _select(sorted(by_category), categories, root, "class")
    return {c: sorted(by_category[c], key=lambda s: str(s.image_path)) for c in chosen}


def _list_visa_raw(class_dir: Path) -> list[Sample]:
    images = class_dir / "Data" / "Images"
    masks = class_dir / "Data" / "Masks" / "Anomaly"
    samples = [Sample(p, None, 0, GOOD) for p in _images_in(images / "Normal")] if (images / "Normal").is_dir() else []
    if (images / "Anomaly").is_dir():
        for image in _images_in(images / "Anomaly"):
            mask = masks / f"{image.stem}.png"
            if not mask.is_file():
                raise DatasetError(f"{image}: no mask {mask}")
            samples.append(Sample(image, mask, 1, "anomaly"))
    return sorted(samples, key=lambda s: str(s.image_path))


def _list_mtd(root: Path, categories: list[str] | None) -> dict[str, list[Sample]]:
    """root/MT_<class>/Imgs/<name>.jpg with <name>.png masks beside; MT_Free is good; one category "mtd"."""
    if categories and list(dict.fromkeys(categories)) != [MTD_CATEGORY]:
        raise DatasetError(f"MTD is one category, {MTD_CATEGORY!r}; got --category {' '.join(categories)}")
    classes = sorted(p for p in root.iterdir() if p.name.startswith("MT_") and (p / "Imgs").is_dir())
    if not classes:
        raise DatasetError(f"{root}: no MT_<class>/Imgs folders; expected the MTD layout "
                           "root/MT_<class>/Imgs/<name>.jpg with <name>.png masks beside")
    samples = []
    for class_dir in classes:
        good = class_dir.name == "MT_Free"
        defect_type = GOOD if good else class_dir.name[3:].lower()
        for image in sorted((class_dir / "Imgs").glob("*.jpg")):
            mask = image.with_suffix(".png")
            if not mask.is_file():
                if not good:
                    raise DatasetError(f"{image}: no mask {mask.name} beside it")
                mask = None
            samples.append(Sample(image, mask, int(not good), defect_type, SOFT_MASK_THRESHOLD))
    return {MTD_CATEGORY: samples}


def _list_folder(root: Path, categories: list[str] | None) -> dict[str, list[Sample]]:
    """root/images/* and root/masks/<stem>.png (missing or empty mask: good). The category is named by
    --category (one name) or else by the root folder."""
    if categories and len(set(categories)) > 1:
        raise DatasetError(f"a folder dataset is one category; got --category {' '.join(categories)}")
    images, masks = root / "images", root / "masks"
    if not images.is_dir():
        raise DatasetError(f"{root}: no images/ folder; expected root/images/* and root/masks/<same stem>.png")
    samples = []
    for image in _images_in(images):
        mask = masks / f"{image.stem}.png"
        if not mask.is_file():
            samples.append(Sample(image, None, 0, GOOD, SOFT_MASK_THRESHOLD))
            continue
        sample = Sample(image, mask, 1, "defect", SOFT_MASK_THRESHOLD)
        if not read_mask(sample).any():
            sample = Sample(image, mask, 0, GOOD, SOFT_MASK_THRESHOLD)
        samples.append(sample)
    return {categories[0] if categories else root.name: samples}
