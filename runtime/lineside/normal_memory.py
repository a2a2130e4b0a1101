"""A memory of normal parts: saliency-CNN features of good images, searched per position.

The saliency CNN's features at the single-object grid (64x64 for a 256x256 input) of K good
images form a bank, reduced to at most `capacity` rows by a greedy k-center coreset. With a
memory, the saliency prompt P^S scores each grid position by its distance to the nearest bank
features, d = 0.5 * (1 - cos) (the saliency's own units), blended with the self-similarity
saliency: grid = (1 - blend) * self_similarity + blend * memory_distance (the distance grid
blurred by blur_sigma grid cells). The rest of SAA+
(rescoring, fusion) takes that map unchanged. An empty memory gives the zero-shot map exactly.

The defaults (blend 1.0: the memory distance alone once the memory holds anything, which also
skips the self-similarity's cost; blur_sigma) were chosen on the tune split of mtd-dev
(python -m bench.fewshot --tune, docs/line-side.md).

A memory belongs to one saliency CNN: its file records the engine's sha256 and preprocessing,
and loading it next to other engines is refused. Its content sha256 (features, sources and
settings) is stored in the file and checked on load.
`python -m runtime.memory` builds one from a folder of good parts.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np

from .. import manifest as mf
from ..errors import ConfigError, SaaError
from ..stages.saliency import smooth_grid
from ..stages.saliency_kernels import knn_distance_mean
from .memory_kernels import DEFAULT_BLOCK_BYTES, check_rows, greedy_coreset, nearest_distance, project

FORMAT = "saa-normal-memory"
FORMAT_VERSION = 1
DEFAULT_CAPACITY = 1024  # chosen on the mtd-dev tune split: 1024..4096 score alike, 1024 searches 4x faster
DEFAULT_BLEND = 1.0  # chosen on the mtd-dev tune split (docs/line-side.md)
DEFAULT_BLUR_SIGMA = 2.0  # chosen on the mtd-dev tune split (docs/line-side.md)
BUILD_POOL_FACTOR = 16  # building from images: reduce whenever the pool reaches 16 x capacity


class MemoryFileError(SaaError, ValueError):
    """A memory file is unreadable, damaged, or belongs to other engines."""


@dataclass(frozen=True)
class MemorySettings:
    """capacity: most features kept (the coreset's bound, and so the search's time bound).
    k: nearest bank features averaged per position.
    blend: weight of the memory distance in the saliency map (0: zero-shot, 1: memory only).
    blur_sigma: Gaussian blur of the memory distance grid, in grid cells (0: none).
    projection: dimensions the coreset picks centres in (None: all channels).
    slack: when a memory that grows (streaming) passes its capacity it is reduced to
        capacity - slack, so the next reduction comes `slack` features later (None: capacity // 4).
    """

    capacity: int = DEFAULT_CAPACITY
    k: int = 1
    blend: float = DEFAULT_BLEND
    blur_sigma: float = DEFAULT_BLUR_SIGMA
    projection: int | None = 64
    slack: int | None = None

    def checked(self) -> "MemorySettings":
        def integer(value: Any, low: int) -> bool:
            return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= low

        if not integer(self.capacity, 1):
            raise ConfigError(f"memory capacity must be an integer >= 1, got {self.capacity!r}")
        if not integer(self.k, 1):
            raise ConfigError(f"memory k must be an integer >= 1, got {self.k!r}")
        if isinstance(self.blend, bool) or not isinstance(self.blend, (int, float)) or not 0.0 <= self.blend <= 1.0:
            raise ConfigError(f"memory blend must be a number in [0, 1], got {self.blend!r}")
        if isinstance(self.blur_sigma, bool) or not isinstance(self.blur_sigma, (int, float)) \
                or not 0.0 <= self.blur_sigma < 1e3:
            raise ConfigError(f"memory blur_sigma must be a number of grid cells in [0, 1000), got {self.blur_sigma!r}")
        if self.projection is not None and not integer(self.projection, 1):
            raise ConfigError(f"memory projection must be null or an integer >= 1, got {self.projection!r}")
        if self.slack is not None and not (integer(self.slack, 0) and self.slack < self.capacity):
            raise ConfigError(f"memory slack must be null or an integer in [0, capacity), got {self.slack!r}")
        return replace(self, capacity=int(self.capacity), k=int(self.k), blend=float(self.blend),
                       blur_sigma=float(self.blur_sigma))

    @property
    def low_water(self) -> int:
        slack = self.capacity // 4 if self.slack is None else self.slack
        return self.capacity - slack


def binding_of(manifest: mf.Manifest, extractor: Any) -> dict[str, Any]:
    """What a memory's features depend on: the saliency CNN file and how its input and output are
    prepared (size, layers, contrast, padding; see SaliencyExtractor.single_object_features)."""
    record = manifest.preprocess.get("saliency", {})
    model = manifest.models.get(mf.SALIENCY, {})
    settings = extractor.settings
    index = getattr(extractor, "channel_index", None)
    return {"saliency_sha256": model.get("sha256"), "backbone": record.get("backbone"),
            "mean": record.get("mean"), "std": record.get("std"), "stride": record.get("stride"),
            "size": int(extractor.single_size),
            "channels": int(extractor.channels if index is None else len(index)),
            "layers": list(settings.layers) if getattr(settings, "layers", None) else None,
            "contrast": getattr(settings, "contrast", "none"), "pad": int(getattr(settings, "pad", 0))}


@dataclass
class SaliencyGrids:
    """One image's saliency on the feature grid, as the pipeline computed it with a memory."""

    features: np.ndarray  # [C, h, w] float32, unit length over C
    self_grid: np.ndarray | None  # [h, w] zero-shot self-similarity saliency (None: not needed, blend 1)
    memory_grid: np.ndarray | None  # [h, w] distance to the nearest memory features (None: memory empty)
    grid: np.ndarray  # [h, w] the blend the pipeline used


def single_object_grids(extractor: Any, image: np.ndarray, n: int | None = None,
                        mode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features [C, h, w], self-similarity grid [h, w]) from one CNN run: the steps of
    SaliencyExtractor.single_object_grid (tests hold the grid equal to it), keeping the features."""
    changes = {key: value for key, value in (("n", n), ("mode", mode)) if value is not None}
    settings = replace(extractor.settings, **changes).checked()
    features = extractor.single_object_features(image)
    channels, height, width = features.shape
    grid = knn_distance_mean(features.reshape(channels, -1), settings.n, settings.mode, settings.exclude_self,
                             settings.block_bytes, getattr(extractor, "gemm_backend", "onnxruntime"))
    return features, smooth_grid(grid.reshape(height, width), settings.blur_sigma)


def as_rows(features: np.ndarray) -> np.ndarray:
    """[C, h, w] grid features -> [h*w, C] rows, re-normalised (unit length, as the CNN promises)."""
    features = np.asarray(features, np.float32)
    if features.ndim != 3:
        raise ValueError(f"grid features must be [C, h, w], got shape {features.shape}")
    rows = np.ascontiguousarray(features.reshape(features.shape[0], -1).T)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, np.float32(1e-12))


class NormalMemory:
    """A bounded bank of normal features [N <= capacity, C] with where each came from.

    sources[i] = (image serial, grid position) of row i: build images get serials 0..K-1
    (names in `images`), images added later (streaming) the next serials.
    """

    def __init__(self, binding: dict[str, Any], settings: MemorySettings | None = None,
                 features: np.ndarray | None = None, sources: np.ndarray | None = None,
                 images: Sequence[str] = (), next_serial: int | None = None, radius: float | None = None) -> None:
        self.binding = dict(binding)
        self.settings = (settings or MemorySettings()).checked()
        channels = self.binding.get("channels")
        if not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"memory binding lacks the feature channels: {binding!r}")
        self.channels = channels
        features = np.zeros((0, channels), np.float32) if features is None else check_rows(features, "memory features",
                                                                                            channels)
        sources = np.zeros((0, 2), np.int64) if sources is None else np.asarray(sources, np.int64)
        if sources.shape != (len(features), 2):
            raise ValueError(f"memory sources must be [{len(features)}, 2], got {sources.shape}")
        if len(features) > self.settings.capacity:
            raise ValueError(f"memory holds {len(features)} features, more than its capacity {self.settings.capacity}")
        self.features, self.sources = features, sources
        self.images = list(images)
        self.next_serial = len(self.images) if next_serial is None else int(next_serial)
        self.radius = radius  # coverage of the last reduction (squared distance in the projection)
        self._lock = threading.Lock()  # add() may run while other threads search
        self.mark_initial()

    # ------------------------------------------------------------------ building

    @classmethod
    def empty(cls, manifest: mf.Manifest, extractor: Any, settings: MemorySettings | None = None) -> "NormalMemory":
        return cls(binding_of(manifest, extractor), settings)

    @classmethod
    def from_images(cls, extractor: Any, manifest: mf.Manifest, images: Iterable[tuple[str, np.ndarray]],
                    settings: MemorySettings | None = None) -> "NormalMemory":
        """A memory from good images (name, BGR uint8 array): all their grid features, reduced to the
        capacity by one greedy coreset (in rounds of BUILD_POOL_FACTOR x capacity when there are many)."""
        memory = cls.empty(manifest, extractor, settings)
        pool, pool_sources = [memory.features], [memory.sources]
        pooled = 0
        limit = BUILD_POOL_FACTOR * memory.settings.capacity
        for name, image in images:
            rows = as_rows(extractor.single_object_features(image))
            serial = memory.next_serial
            memory.images.append(str(name))
            memory.next_serial += 1
            pool.append(rows)
            pool_sources.append(np.stack([np.full(len(rows), serial), np.arange(len(rows))], axis=1))
            pooled += len(rows)
            if pooled >= limit:  # bounded memory while building from many images
                memory._reduce(np.concatenate(pool), np.concatenate(pool_sources), memory.settings.capacity)
                pool, pool_sources, pooled = [memory.features], [memory.sources], len(memory.features)
        if not memory.images:
            raise ConfigError("no good images to build a memory from")
        memory._reduce(np.concatenate(pool), np.concatenate(pool_sources), memory.settings.capacity)
        memory.mark_initial()
        return memory

    def _reduce(self, rows: np.ndarray, sources: np.ndarray, size: int) -> None:
        if len(rows) > size:
            chosen, radius = greedy_coreset(project(rows, self.settings.projection), size)
            rows, sources, self.radius = rows[chosen], sources[chosen], radius
        self.features, self.sources = np.ascontiguousarray(rows), np.ascontiguousarray(sources)

    def new_serial(self) -> int:
        with self._lock:
            serial = self.next_serial
            self.next_serial += 1
            return serial

    def add(self, rows: np.ndarray, serial: int, positions: np.ndarray) -> None:
        """Add features [P, C] of image `serial` at grid `positions`; past the capacity the bank is
        reduced by the coreset to capacity - slack (so it never holds more than its capacity)."""
        rows = check_rows(rows, "added features", self.channels)
        positions = np.asarray(positions, np.int64).reshape(-1)
        if len(positions) != len(rows):
            raise ValueError(f"{len(rows)} added features but {len(positions)} positions")
        if not len(rows):
            return
        sources = np.stack([np.full(len(rows), int(serial), np.int64), positions], axis=1)
        with self._lock:
            all_rows = np.concatenate([self.features, rows])
            all_sources = np.concatenate([self.sources, sources])
            if len(all_rows) > self.settings.capacity:
                self._reduce(all_rows, all_sources, self.settings.low_water)
            else:
                self.features, self.sources = all_rows, all_sources

    def mark_initial(self) -> None:
        """Remember the present state as the one reset() returns to; initial_sha256 identifies it
        (what a calibration made with this memory records)."""
        self._initial = (self.features, self.sources, list(self.images), self.next_serial, self.radius)
        self.initial_sha256 = self.content_sha256()

    def reset(self) -> None:
        """Back to the state it was built or loaded in (for a streaming memory started empty: empty)."""
        with self._lock:
            features, sources, images, serial, radius = self._initial
            self.features, self.sources, self.images = features, sources, list(images)
            self.next_serial, self.radius = serial, radius

    def __len__(self) -> int:
        return len(self.features)

    # ------------------------------------------------------------------ scoring

    def distance_grid(self, features: np.ndarray, block_bytes: int = DEFAULT_BLOCK_BYTES) -> np.ndarray:
        """[h, w]: per position, the mean distance to its k nearest memory features (memory not empty)."""
        rows = as_rows(features)
        bank = self.features  # one reference: a concurrent add() swaps in a new array
        distance = nearest_distance(rows, bank, self.settings.k, block_bytes)
        return distance.reshape(features.shape[1:])

    def grids(self, extractor: Any, image: np.ndarray, n: int | None = None, mode: str | None = None) -> SaliencyGrids:
        """The saliency grids of one image: self-similarity, memory distance and their blend."""
        if len(self.features) and self.settings.blend == 1.0:
            # memory only: the self-similarity (most of the zero-shot saliency's time) is not needed
            features = extractor.single_object_features(image)
            memory_grid = self.memory_map(features)
            return SaliencyGrids(features, None, memory_grid, memory_grid)
        features, self_grid = single_object_grids(extractor, image, n, mode)
        if not len(self.features):
            return SaliencyGrids(features, self_grid, None, self_grid)
        memory_grid = self.memory_map(features)
        return SaliencyGrids(features, self_grid, memory_grid, self.blend(self_grid, memory_grid))

    def memory_map(self, features: np.ndarray) -> np.ndarray:
        """The memory's part of P^S: the distance grid, blurred by blur_sigma grid cells."""
        return smooth_grid(self.distance_grid(features), self.settings.blur_sigma)

    def blend_map(self, extractor: Any, image: np.ndarray, saliency_map: np.ndarray,
                  grids: list | None = None) -> np.ndarray:
        """A saliency map at image size (the multi-object one) blended with the memory distance
        (single-object grid, resized bilinear); appends the grids to `grids` for a stream."""
        features = extractor.single_object_features(image)
        height, width = image.shape[:2]
        memory_grid, blended = None, saliency_map
        if len(self.features):
            memory_grid = self.memory_map(features)
            blended = self.blend(saliency_map, cv2.resize(memory_grid, (width, height)))
        if grids is not None:
            grid_size = features.shape[:0:-1]  # (w, h) for cv2

            def small(values: np.ndarray) -> np.ndarray:
                return cv2.resize(values.astype(np.float32), grid_size, interpolation=cv2.INTER_AREA)

            grids.append(SaliencyGrids(features, small(saliency_map), memory_grid, small(blended)))
        return blended

    def blend(self, self_grid: np.ndarray, memory_grid: np.ndarray) -> np.ndarray:
        weight = np.float32(self.settings.blend)
        if weight == 1.0:
            return memory_grid.astype(np.float32)
        return ((np.float32(1.0) - weight) * self_grid + weight * memory_grid).astype(np.float32)

    # ------------------------------------------------------------------ files

    def meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "binding": self.binding,
                "settings": asdict(self.settings), "images": self.images, "next_serial": self.next_serial,
                "radius": self.radius, "size": len(self.features)}

    def content_sha256(self) -> str:
        """sha256 over the settings, binding, image names, features and sources (not the file's bytes,
        not a streaming memory's extra state)."""
        digest = hashlib.sha256(json.dumps(self.meta(), sort_keys=True).encode())
        digest.update(np.ascontiguousarray(self.features, np.float32).tobytes())
        digest.update(np.ascontiguousarray(self.sources, np.int64).tobytes())
        return digest.hexdigest()

    def save(self, path: str | Path, extra: dict[str, Any] | None = None,
             arrays: dict[str, np.ndarray] | None = None) -> str:
        """Write an .npz (features, sources, meta JSON with the content sha256); return that sha256.
        `extra`/`arrays`: state of a streaming memory saved alongside."""
        path = Path(path)
        sha = self.content_sha256()
        meta = {**self.meta(), "extra": extra, "content_sha256": sha}
        try:
            with open(path, "wb") as handle:  # a file object: np.savez would append .npz to other names
                np.savez(handle, features=self.features, sources=self.sources,
                         meta=np.array(json.dumps(meta)), **(arrays or {}))
        except OSError as err:
            raise MemoryFileError(f"{path}: cannot write the memory ({err.strerror})") from None
        return sha

    @classmethod
    def load(cls, path: str | Path, settings: MemorySettings | None = None) -> "NormalMemory":
        """Read a memory file (check it against a pipeline with check_binding).
        `settings` replaces the saved ones (capacity must still hold the saved features)."""
        memory, _, _ = cls.load_with_state(path, settings)
        return memory

    @classmethod
    def load_with_state(cls, path: str | Path, settings: MemorySettings | None = None
                        ) -> tuple["NormalMemory", dict[str, Any] | None, dict[str, np.ndarray]]:
        path = Path(path)
        if not path.is_file():
            raise MemoryFileError(f"{path}: memory file not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
            meta = json.loads(str(arrays.pop("meta")))
        except Exception as err:  # zip, npy and JSON readers raise many types
            raise MemoryFileError(f"{path}: not a memory file ({type(err).__name__}: {str(err).splitlines()[0]})") \
                from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise MemoryFileError(f"{path}: not a memory file written by runtime.memory")
        if meta.get("format_version") != FORMAT_VERSION:
            raise MemoryFileError(f"{path}: memory format {meta.get('format_version')!r}, this runtime reads "
                                  f"{FORMAT_VERSION}: rebuild it")
        try:
            saved = MemorySettings(**meta["settings"])
            memory = cls(meta["binding"], saved, arrays.pop("features"), arrays.pop("sources"), meta["images"],
                         meta["next_serial"], meta["radius"])
        except (KeyError, TypeError, ValueError) as err:
            raise MemoryFileError(f"{path}: memory file is damaged ({err})") from None
        if memory.content_sha256() != meta.get("content_sha256"):
            raise MemoryFileError(f"{path}: memory content fails its sha256 check: the file is damaged")
        if settings is not None:
            settings = settings.checked()
            if len(memory) > settings.capacity:
                raise ConfigError(f"{path}: the memory holds {len(memory)} features, more than capacity "
                                  f"{settings.capacity}")
            memory.settings = settings
            memory.mark_initial()
        return memory, meta.get("extra"), arrays

    def check_binding(self, manifest: mf.Manifest, extractor: Any, path: str | Path = "memory") -> None:
        """Refuse a memory made with another saliency CNN or other saliency preprocessing."""
        expected = binding_of(manifest, extractor)
        if self.binding.get("saliency_sha256") != expected["saliency_sha256"]:
            raise MemoryFileError(
                f"{path} was built for other engines (saliency sha256 {str(self.binding.get('saliency_sha256'))[:12]}, "
                f"{manifest.engine_dir} has {str(expected['saliency_sha256'])[:12]}): rebuild it with "
                f"`python -m runtime.memory --engine-dir {manifest.engine_dir} ...`")
        different = sorted(key for key in expected if self.binding.get(key) != expected[key])
        if different:
            raise MemoryFileError(f"{path} was built with other saliency settings ({', '.join(different)} differ "
                                  f"from this pipeline's): rebuild it")

    def describe(self) -> dict[str, Any]:
        """For calibration files and JSON outputs."""
        return {"sha256": self.content_sha256(), "size": len(self),
                "images": len(self.images), "settings": asdict(self.settings)}
