"""bench.datasets on fake MVTec / VisA / folder layouts and the real MTD images in tests/data/mtd-mini."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from bench.datasets import DatasetError, Sample, list_samples, read_mask, subsample
from runtime.errors import ImageError


def write_png(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), values)
    return path


def image(h: int = 8, w: int = 10) -> np.ndarray:
    return np.full((h, w, 3), 128, np.uint8)


def mask(h: int = 8, w: int = 10, value: int = 255) -> np.ndarray:
    values = np.zeros((h, w), np.uint8)
    values[2:4, 3:6] = value
    return values


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    for category in ("bottle", "screw"):
        base = tmp_path / category
        write_png(base / "train" / "good" / "000.png", image())
        write_png(base / "test" / "good" / "000.png", image())
        write_png(base / "test" / "good" / "001.png", image())
        write_png(base / "test" / "broken" / "000.png", image())
        write_png(base / "ground_truth" / "broken" / "000_mask.png", mask())
    (tmp_path / "license.txt").write_text("x")
    return tmp_path


def test_mvtec_lists_test_images_with_masks(mvtec: Path) -> None:
    listed = list_samples("mvtec", mvtec)
    assert list(listed) == ["bottle", "screw"]
    samples = listed["bottle"]
    assert [(s.image_path.relative_to(mvtec).as_posix(), s.label, s.defect_type) for s in samples] == [
        ("bottle/test/broken/000.png", 1, "broken"), ("bottle/test/good/000.png", 0, "good"),
        ("bottle/test/good/001.png", 0, "good")]
    assert samples[0].mask_path == mvtec / "bottle/ground_truth/broken/000_mask.png"
    assert samples[1].mask_path is None
    assert read_mask(samples[0], (8, 10)).sum() == 6
    assert not read_mask(samples[1], (8, 10)).any()


def test_mvtec_category_selection_and_errors(mvtec: Path, tmp_path: Path) -> None:
    assert list(list_samples("mvtec", mvtec, ["screw"])) == ["screw"]
    with pytest.raises(DatasetError, match="no category 'cable'; found: bottle, screw"):
        list_samples("mvtec", mvtec, ["cable"])
    with pytest.raises(DatasetError, match="one category's folder.*--category bottle"):
        list_samples("mvtec", mvtec / "bottle")
    with pytest.raises(DatasetError, match="not a folder"):
        list_samples("mvtec", mvtec / "missing")
    with pytest.raises(DatasetError, match="no <category>/test folders"):
        list_samples("mvtec", mvtec / "bottle" / "train")
    (mvtec / "screw/ground_truth/broken/000_mask.png").unlink()
    with pytest.raises(DatasetError, match="000.png: no ground-truth mask"):
        list_samples("mvtec", mvtec, ["screw"])
    with pytest.raises(DatasetError, match="unknown dataset 'kolektor'"):
        list_samples("kolektor", mvtec)


def test_visa_split_csv_layout(tmp_path: Path) -> None:
    for name in ("Normal/0000.JPG", "Normal/0001.JPG", "Anomaly/000.JPG"):
        write_png(tmp_path / "candle/Data/Images" / name, image())  # PNG bytes; the suffix is what's listed
    write_png(tmp_path / "candle/Data/Masks/Anomaly/000.png", mask(value=1))  # VisA masks: small label values
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n")
    samples = list_samples("visa", tmp_path)["candle"]
    assert [(s.image_path.name, s.label) for s in samples] == [("000.JPG", 1), ("0000.JPG", 0)]
    assert read_mask(samples[0], (8, 10)).sum() == 6  # value 1 counts as defect (> 0)
    with pytest.raises(DatasetError, match="no class 'pcb1'; found: candle"):
        list_samples("visa", tmp_path, ["pcb1"])
    (tmp_path / "candle/Data/Masks/Anomaly/000.png").unlink()
    with pytest.raises(DatasetError, match="lists .*000.png, which does not exist"):
        list_samples("visa", tmp_path)


def test_visa_per_class_layout_without_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_png(tmp_path / "pcb1/Data/Images/Normal/0000.JPG", image())
    write_png(tmp_path / "pcb1/Data/Images/Anomaly/000.JPG", image())
    write_png(tmp_path / "pcb1/Data/Masks/Anomaly/000.png", mask())
    samples = list_samples("visa", tmp_path)["pcb1"]
    assert sorted((s.image_path.name, s.label) for s in samples) == [("000.JPG", 1), ("0000.JPG", 0)]
    assert "every image of each class is a test image" in capsys.readouterr().err


def test_visa_converted_layout_and_unknown_layout(tmp_path: Path) -> None:
    write_png(tmp_path / "1cls/fryum/test/good/0000.JPG", image())
    write_png(tmp_path / "1cls/fryum/test/bad/000.JPG", image())
    write_png(tmp_path / "1cls/fryum/ground_truth/bad/000.png", mask())  # the split script drops "_mask"
    samples = list_samples("visa", tmp_path / "1cls")["fryum"]
    assert [(s.defect_type, s.mask_path.name if s.mask_path else None) for s in samples] == [
        ("bad", "000.png"), ("good", None)]
    with pytest.raises(DatasetError, match="not a VisA layout"):
        list_samples("visa", tmp_path / "1cls" / "fryum" / "test" / "good")


def test_mtd_mini_is_one_category(data_dir: Path) -> None:
    root = data_dir / "mtd-mini"
    listed = list_samples("mtd", root)
    assert list(listed) == ["mtd"]
    samples = listed["mtd"]
    assert [(s.defect_type, s.label) for s in samples] == [
        ("blowhole", 1), ("crack", 1), ("good", 0), ("good", 0)]
    assert all(s.mask_path is not None and s.mask_threshold == 127 for s in samples)
    assert list_samples("mtd", root, ["mtd"])["mtd"] == samples
    with pytest.raises(DatasetError, match="MTD is one category"):
        list_samples("mtd", root, ["crack"])
    with pytest.raises(DatasetError, match="no MT_<class>/Imgs folders"):
        list_samples("mtd", root / "MT_Crack")


def test_mtd_soft_masks_threshold_at_127(data_dir: Path) -> None:
    sample = list_samples("mtd", data_dir / "mtd-mini")["mtd"][1]
    raw = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE)
    assert 0 < (raw > 127).sum() < (raw > 0).sum()  # the soft edge is really there
    assert np.array_equal(read_mask(sample, raw.shape), raw > 127)
    with pytest.raises(DatasetError, match="mask is 122x285 but its image .* is 10x8"):
        read_mask(sample, (8, 10))


def test_folder_layout(tmp_path: Path) -> None:
    write_png(tmp_path / "images/a.png", image())
    write_png(tmp_path / "images/b.jpg", image())
    write_png(tmp_path / "images/c.png", image())
    write_png(tmp_path / "masks/a.png", mask())
    write_png(tmp_path / "masks/c.png", np.zeros((8, 10), np.uint8))  # empty mask: good
    (tmp_path / "images/notes.txt").write_text("not an image")
    listed = list_samples("folder", tmp_path)
    assert list(listed) == [tmp_path.name]
    assert [(s.image_path.name, s.label) for s in listed[tmp_path.name]] == [("a.png", 1), ("b.jpg", 0), ("c.png", 0)]
    assert list(list_samples("folder", tmp_path, ["washers"])) == ["washers"]
    write_png(tmp_path / "masks/b.png", mask(value=1))  # a 0/1 mask would silently read as empty
    with pytest.raises(DatasetError, match="b.png: mask values only reach 1, none above 127"):
        list_samples("folder", tmp_path)
    with pytest.raises(DatasetError, match="no images/ folder"):
        list_samples("folder", tmp_path / "masks")


def test_unreadable_mask_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "m.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="m.png: not a readable image"):
        read_mask(Sample(tmp_path / "i.png", bad, 1, "x"))


def test_subsample_is_stratified_and_seeded() -> None:
    samples = [Sample(Path(f"{i:03d}.png"), None, int(i < 20), "x") for i in range(100)]
    picked = subsample(samples, 10, seed=1)
    assert len(picked) == 10 and sum(s.label for s in picked) == 2
    assert picked == subsample(samples, 10, seed=1) != subsample(samples, 10, seed=2)
    assert picked == sorted(picked, key=lambda s: s.image_path.name)
    assert sum(s.label for s in subsample(samples, 2, seed=0)) == 1  # both kinds kept
    assert subsample(samples, None) == samples == subsample(samples, 500)
