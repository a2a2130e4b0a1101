"""Where official weights come from, and a download that explains itself when it cannot happen.

Export runs on a networked workstation; when no checkpoint path is given, the
official file is fetched into a cache once. Where that fails (no network, a
proxy, this CI), the error names the exact file, its size and where to put it.
"""
from __future__ import annotations

import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from runtime.manifest import sha256_of

from .common import ExportError


@dataclass(frozen=True)
class OfficialCheckpoint:
    name: str  # file name the official source uses
    url: str
    size_bytes: int  # published size, for the user's check and our error message
    what: str


OFFICIAL = {
    "groundingdino_swint_ogc": OfficialCheckpoint(
        "groundingdino_swint_ogc.pth",
        "https://huggingface.co/ShilongLiu/GroundingDINO/resolve/main/groundingdino_swint_ogc.pth",
        693_997_677,
        "GroundingDINO Swin-T OGC (IDEA-Research)",
    ),
    "sam_vit_h": OfficialCheckpoint(
        "sam_vit_h_4b8939.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        2_564_550_879,
        "Segment Anything ViT-H (Meta)",
    ),
    "sam_vit_l": OfficialCheckpoint(
        "sam_vit_l_0b3195.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        1_249_524_607,
        "Segment Anything ViT-L (Meta)",
    ),
    "sam_vit_b": OfficialCheckpoint(
        "sam_vit_b_01ec64.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        375_042_383,
        "Segment Anything ViT-B (Meta)",
    ),
    "wide_resnet50_2": OfficialCheckpoint(
        "wide_resnet50_2-95faca4d.pth",
        "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
        138_223_492,
        "WideResNet50-2 ImageNet (torchvision)",
    ),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SAA_CHECKPOINT_CACHE", Path.home() / ".cache" / "saa-edge" / "checkpoints"))


def resolve_checkpoint(key: str, path: str | Path | None = None, cache_dir: Path | None = None) -> Path:
    """The checkpoint file for `key`: the user's path, a cached copy, or a fresh download.

    Raises ExportError with the file name, size and destination when none of these works.
    """
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ExportError(f"checkpoint {path} does not exist")
        return path
    official = OFFICIAL[key]
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / official.name
    if target.is_file():
        return target
    partial = target.with_suffix(target.suffix + ".part")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(official.url, timeout=30) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 22)
        partial.replace(target)
    except Exception as err:  # network, proxy, disk: all end in the same instructions
        partial.unlink(missing_ok=True)
        raise ExportError(
            f"could not download {official.what}: {err}\n"
            f"  download {official.name} ({official.size_bytes / 1e6:,.0f} MB) from {official.url}\n"
            f"  and put it at {target} (or pass its path on the command line)"
        ) from None
    return target


def checkpoint_record(path: Path | None, kind: str) -> dict:
    """What the manifest says about a model's weights."""
    if path is None:
        return {"kind": kind, "path": None, "sha256": None}
    return {"kind": kind, "path": str(path), "sha256": sha256_of(path) if Path(path).is_file() else None}
