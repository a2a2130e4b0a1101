"""Which files of a run's inputs are parts: images under the input folders, the masks stored
beside them, and earlier runs' output folders left out. runtime.infer, runtime.calibrate and
runtime.memory read folders with these same rules.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .errors import ConfigError
from .image_io import IMAGE_SUFFIXES

# The run table runtime.infer writes (outputs/summary.py): its name and header mark a folder as an
# earlier run's outputs, whose maps and overlays are not parts.
SUMMARY_NAME = "summary.csv"
SUMMARY_COLUMNS = ("image", "outputs", "status", "image_score", "label", "exact", "fused_regions", "top_prompt",
                   "top_phrase", "top_score", "end_to_end_ms", "error")
# The header before the exact column: tables of earlier versions mark their folders too.
EARLIER_SUMMARY_COLUMNS = tuple(column for column in SUMMARY_COLUMNS if column != "exact")


def is_mask_file(path: Path, stems_of_other_images: set[str]) -> bool:
    """A defect mask stored beside its image, not a part: <stem>_mask.png (also what
    `runtime.infer` writes), or <stem>.png beside a non-PNG image of that stem (MTD's layout)."""
    return path.stem.endswith("_mask") or (path.suffix.lower() == ".png" and path.stem in stems_of_other_images)


def _under_any(path: Path, folders: list[Path]) -> bool:
    return any(path.is_relative_to(folder) for folder in folders)


def list_images(inputs: list[str | Path], exclude: str | Path | Sequence[str | Path] | None = None) -> list[Path]:
    """Expand files and folders (recursively, sorted) into image paths; missing inputs are kept
    so the caller reports them as per-file failures. In folders, masks beside their images
    (is_mask_file) and anything under `exclude` (one folder or several: the output folder, an
    earlier run's) are left out; files named one by one are always kept."""
    if exclude is None:
        excluded: list[str | Path] = []
    elif isinstance(exclude, (str, Path)):
        excluded = [exclude]
    else:
        excluded = list(exclude)
    skips = [Path(folder).resolve() for folder in excluded]
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if not item.is_dir():
            paths.append(item)
            continue
        found = [p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(item).parts)
                 and not (skips and _under_any(p.resolve(), skips))]
        stems: dict[Path, set[str]] = {}  # per folder, the stems of its non-PNG images
        for p in found:
            if p.suffix.lower() != ".png":
                stems.setdefault(p.parent, set()).add(p.stem)
        paths.extend(sorted(p for p in found if not is_mask_file(p, stems.get(p.parent, set()))))
    return list(dict.fromkeys(paths))  # a file named twice is processed once


def earlier_run_folders(inputs: Sequence[str | Path]) -> list[Path]:
    """Folders under the input folders that hold an earlier run's outputs: a summary.csv that
    starts with this table's header. Their maps and overlays are not parts to inspect."""
    headers = {",".join(SUMMARY_COLUMNS), ",".join(EARLIER_SUMMARY_COLUMNS)}
    found = []
    for item in inputs:
        if not Path(item).is_dir():
            continue
        for table in Path(item).rglob(SUMMARY_NAME):
            try:
                with open(table, encoding="utf-8", errors="replace") as file:
                    first = file.readline().strip()
            except OSError:
                continue
            if first in headers:
                found.append(table.parent)
    return sorted(set(found))


def list_parts(folder: str | Path) -> list[tuple[Path, Path | None]]:
    """Images under a folder, subfolders included (as runtime.infer reads folders), with their
    masks (None without one). Files that are another image's mask (masks/<stem>.png beside an
    images/ folder, <stem>_mask.png, <stem>.png beside a non-PNG image) are not parts; hidden
    files and folders and runtime.infer's output folders are left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder of images")
    # runtime.infer's own walk: hidden files, masks beside their images and earlier runs' outputs left out
    parts = []
    for path in list_images([folder], exclude=earlier_run_folders([folder])):
        directory = path.parent
        if directory.name == "masks" and (directory.parent / "images").is_dir():
            continue  # the masks of the images/ folder beside it
        candidates = [path.with_name(f"{path.stem}_mask.png")]
        if directory.name == "images":
            candidates.insert(0, directory.parent / "masks" / f"{path.stem}.png")
        if path.suffix.lower() != ".png":
            candidates.append(path.with_suffix(".png"))
        parts.append((path, next((c for c in candidates if c.is_file()), None)))
    if not parts:
        raise ConfigError(f"{folder}: no images (subfolders included)")
    return parts


def batch_inputs(inputs: Sequence[str | Path], out_dir: Path) -> tuple[list[Path], list[Path]]:
    """(the images of a runtime.infer batch, the earlier output folders left out of it): the output
    folder and earlier runs' output folders under the inputs hold maps and overlays, not parts."""
    earlier = [folder for folder in earlier_run_folders(inputs)
               if not folder.resolve().is_relative_to(Path(out_dir).resolve())]
    return list_images(list(inputs), exclude=[out_dir, *earlier]), earlier
