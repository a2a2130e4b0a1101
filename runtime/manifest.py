"""The engines folder's manifest: one place for file names, shapes and preprocessing constants.

Export writes `manifest.json`; the runtime reads and verifies it. Both import the
constants below, so a resolution or a mean/std is never repeated as a literal.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from .errors import ManifestError
from .values import is_finite_number, is_integer

# Bumped whenever the graphs' inputs/outputs or the manifest's keys change meaning.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Model keys in the manifest, per profile.
GDINO_TEXT = "gdino_text"
GDINO_IMAGE = "gdino_image"
GDINO_HEAD = "gdino_head"
SAM_ENCODER = "sam_encoder"
SAM_DECODER = "sam_decoder"
SALIENCY = "saliency"
PROFILE_MODELS = {
    "full": (GDINO_TEXT, GDINO_IMAGE, GDINO_HEAD, SAM_ENCODER, SAM_DECODER, SALIENCY),
    "lite": (SALIENCY,),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# GroundingDINO (reference: shorter side 800, longer at most 1333, ImageNet mean/std on RGB 0..1).
GDINO_SHORT_SIDE = 800
GDINO_MAX_SIDE = 1333
GDINO_MAX_TEXT_LEN = 256
GDINO_NUM_QUERIES = 900

# SAM (reference: longest side 1024, mean/std on the 0..255 scale, padded square).
SAM_IMAGE_SIZE = 1024
SAM_MASK_SIZE = 256
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# Saliency CNN (reference: 256 for one object, 1024 for several; features at stride 4).
SALIENCY_SINGLE_SIZE = 256
SALIENCY_MULTI_SIZE = 1024
SALIENCY_STRIDE = 4


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class InputSpec(NamedTuple):
    """A graph input as the manifest records it (what onnxruntime's NodeArg gives: name, shape)."""
    name: str
    shape: list[int | str]


@dataclass(frozen=True)
class Manifest:
    engine_dir: Path
    data: dict[str, Any]

    @property
    def profile(self) -> str:
        return self.data["profile"]

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.data["models"]

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.data["preprocess"]

    def preprocess_section(self, name: str, keys: Sequence[str]) -> dict[str, Any]:
        """preprocess[name], checked to hold `keys`; ManifestError naming the file and what is missing."""
        record = self.preprocess.get(name)
        where = self.engine_dir / MANIFEST_NAME
        if not isinstance(record, dict):
            raise ManifestError(f"{where}: no preprocess[{name!r}] section")
        missing = [key for key in keys if key not in record]
        if missing:
            raise ManifestError(f"{where}: preprocess[{name!r}] lacks {missing}")
        return record

    @property
    def random_init(self) -> bool:
        return bool(self.data.get("random_init", False))

    def model_path(self, key: str) -> Path:
        if key not in self.models:
            raise ManifestError(f"{self.engine_dir / MANIFEST_NAME}: profile {self.profile!r} has no model {key!r}")
        return self.engine_dir / self.models[key]["file"]

    def inputs(self, key: str) -> list[InputSpec] | None:
        """Model `key`'s inputs as the exporter recorded them from the graph (names, shapes with
        named dimensions as strings); None where the record lacks them or is malformed."""
        records = self.models.get(key, {}).get("inputs")
        try:
            return [InputSpec(str(r["name"]), list(r["shape"])) for r in records]
        except (TypeError, KeyError):
            return None

    def file_path(self, key: str) -> Path:
        """A non-model file listed under "files" (tokenizer, ...)."""
        files = self.data.get("files", {})
        if key not in files:
            raise ManifestError(f"{self.engine_dir / MANIFEST_NAME}: no file entry {key!r}")
        return self.engine_dir / files[key]["file"]


# Preprocessing constants the runtime computes with: positive integers, and per-channel
# (mean, std) triples of finite numbers with std > 0. Other keys are descriptions.
_SIZES = ("height", "width", "short_side", "max_side", "max_text_len", "num_queries", "image_size", "mask_size",
          "channels", "single_size", "multi_size", "stride")
_TRIPLES = ("mean", "std", "pixel_mean", "pixel_std")


def _check_preprocess(path: Path, preprocess: dict[str, Any]) -> None:
    for section, record in preprocess.items():
        if not isinstance(record, dict):
            raise ManifestError(f"{path}: preprocess[{section!r}] must be an object")
        for key, value in record.items():
            where = f"{path}: preprocess[{section!r}][{key!r}] = {value!r}"
            if key in _SIZES and not (is_integer(value) and value >= 1):
                raise ManifestError(f"{where} must be a positive integer")
            if key in _TRIPLES:
                if not (isinstance(value, list) and len(value) == 3 and all(is_finite_number(v) for v in value)):
                    raise ManifestError(f"{where} must be 3 finite numbers, one per colour channel")
                if key.endswith("std") and min(value) <= 0:
                    raise ManifestError(f"{where}: a standard deviation must be > 0")
            if key == "mask_threshold" and not is_finite_number(value):
                raise ManifestError(f"{where} must be a finite number")


def load_manifest(engine_dir: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and check `engine_dir/manifest.json`; raise ManifestError naming the problem."""
    engine_dir = Path(engine_dir)
    try:
        engine_dir.stat()
    except FileNotFoundError:
        pass  # said below
    except OSError as err:  # a name too long, a loop of links, no permission
        raise ManifestError(f"engines dir {engine_dir}: {err.strerror}") from None
    if engine_dir.is_file():
        raise ManifestError(f"engines dir {engine_dir} is a file: give the folder `python -m export --out` wrote")
    if not engine_dir.is_dir():
        raise ManifestError(f"engines dir {engine_dir} does not exist (run `python -m export --out {engine_dir}` first)")
    path = engine_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} is missing: {engine_dir} is not an engines dir written by `python -m export`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a manifest (top level is not an object)")
    version = data.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        written = f"the string {version!r}" if isinstance(version, str) else repr(version)
        raise ManifestError(
            f"{path} has format_version {written}, this runtime reads {FORMAT_VERSION}: re-export the engines with this version"
        )
    for key in ("profile", "models", "preprocess"):
        if key not in data:
            raise ManifestError(f"{path} lacks the key {key!r}")
    profile = data["profile"]
    if not isinstance(profile, str) or profile not in PROFILE_MODELS:
        raise ManifestError(f"{path}: unknown profile {profile!r} (expected one of {sorted(PROFILE_MODELS)})")
    for key in ("models", "preprocess", "files"):
        if not isinstance(data.get(key, {}), dict):
            raise ManifestError(f"{path}: {key!r} must be an object, got {type(data[key]).__name__}")
    missing = [key for key in PROFILE_MODELS[profile] if key not in data["models"]]
    if missing:
        raise ManifestError(f"{path}: profile {profile!r} lacks models {missing}")
    models = [(f"models.{key}", entry) for key, entry in data["models"].items()]
    entries = models + [(f"files.{key}", entry) for key, entry in data.get("files", {}).items()]
    entries += [(f"{name}.external_data", side) for name, entry in models if isinstance(entry, dict)
                for side in entry.get("external_data", [])]
    for name, entry in entries:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("file", "sha256")):
            raise ManifestError(f"{path}: {name} needs a file name and its sha256 (strings): the manifest was edited "
                                "or damaged (re-export)")
    _check_preprocess(path, data["preprocess"])
    for _, entry in entries:
        file = engine_dir / entry["file"]
        if not file.is_file():
            raise ManifestError(f"{file} is listed in the manifest but missing: the engines dir is incomplete")
        if verify_hashes and sha256_of(file) != entry["sha256"]:
            raise ManifestError(f"{file} fails its sha256 check: the file changed since export (re-export or re-copy it)")
    return Manifest(engine_dir=engine_dir, data=data)
