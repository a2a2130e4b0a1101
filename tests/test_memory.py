"""Normal memory and streaming memory: the search equals brute force, the coreset keeps its bound
and equals its numpy twin, files round-trip and are refused for other engines, the streaming
guard keeps defect features out of a constructed stream, reset restores the start."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime import manifest as mf
from runtime.lineside.decision import Thresholds
from runtime.errors import ConfigError
from runtime.lineside.normal_memory import (MemoryFileError, MemorySettings, NormalMemory, SaliencyGrids, as_rows,
                            single_object_grids)
from runtime.lineside.memory_kernels import (greedy_coreset, greedy_coreset_twin, nearest_distance, nearest_distance_twin,
                                    project)
from runtime.pipeline import Pipeline
from runtime.stages.saliency import smooth_grid
from runtime.lineside.stream import StreamingMemory, StreamSettings

SEARCH_TOLERANCE = 1e-6  # blocked BLAS vs one product: float32 sums of 16..176 terms may round differently


def unit_rows(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    rows = rng.standard_normal((n, c)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("k", [1, 3, 50])
@pytest.mark.parametrize("block_bytes", [1 << 10, 1 << 24])
def test_search_equals_brute_force(k, block_bytes):
    rng = np.random.default_rng(k)
    queries, bank = unit_rows(rng, 300, 24), unit_rows(rng, 40, 24)
    found = nearest_distance(queries, bank, k, block_bytes)
    np.testing.assert_allclose(found, nearest_distance_twin(queries, bank, k), atol=SEARCH_TOLERANCE, rtol=0)
    if k == 1:  # the definition, written out once more: min over the bank of 0.5 * (1 - cos)
        brute = np.array([min(0.5 * (1 - float(q @ b)) for b in bank) for q in queries[:20]])
        np.testing.assert_allclose(found[:20], brute, atol=SEARCH_TOLERANCE)


def test_search_finds_a_query_in_the_bank_at_distance_zero():
    rng = np.random.default_rng(0)
    bank = unit_rows(rng, 64, 16)
    assert np.abs(nearest_distance(bank[[3, 10]], bank)).max() < 1e-6


def test_search_refuses_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="memory is empty"):
        nearest_distance(unit_rows(rng, 4, 8), np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="channels"):
        nearest_distance(unit_rows(rng, 4, 8), unit_rows(rng, 4, 9))
    with pytest.raises(ValueError, match="NaN"):
        nearest_distance(np.full((2, 8), np.nan, np.float32), unit_rows(rng, 4, 8))


def test_coreset_equals_twin_with_exact_sums_and_ties():
    # small integers: every float32 sum is exact, so any order gives the same distances and ties
    points = np.random.default_rng(1).integers(-3, 4, size=(400, 6)).astype(np.float32)
    for size in (1, 7, 60):
        chosen, radius = greedy_coreset(points, size)
        twin, twin_radius = greedy_coreset_twin(points, size)
        np.testing.assert_array_equal(chosen, twin)
        assert radius == twin_radius


def test_coreset_on_real_valued_rows_is_greedy_k_center():
    points = project(unit_rows(np.random.default_rng(2), 2000, 40), 16)
    chosen, radius = greedy_coreset(points, 50)
    twin, twin_radius = greedy_coreset_twin(points, 50)
    np.testing.assert_array_equal(chosen, twin)
    assert radius == pytest.approx(twin_radius, rel=1e-5)
    # what the radius promises: every row lies within it of a chosen row
    nearest = ((points[:, None, :] - points[chosen][None]) ** 2).sum(axis=2).min(axis=1)
    assert nearest.max() == pytest.approx(radius, rel=1e-5)
    assert len(set(chosen.tolist())) == 50


# ---------------------------------------------------------------- a fake saliency extractor


@dataclass
class FakeSettings:
    n: int = 8
    mode: str = "farthest"
    exclude_self: bool | None = None
    block_bytes: int = 1 << 20
    blur_sigma: float = 0.0
    layers: tuple | None = None
    contrast: str = "none"
    pad: int = 0

    def checked(self):
        return self


@dataclass
class FakeExtractor:
    """Features from the image itself: a grid cell's channels are its pixels' values (unit length)."""

    channels: int = 12
    single_size: int = 32
    stride: int = 4
    settings: FakeSettings = field(default_factory=FakeSettings)
    channel_index: None = None

    def single_object_features(self, image: np.ndarray) -> np.ndarray:
        grid = self.single_size // self.stride
        small = cv2.resize(image, (grid * 2, grid * 2), interpolation=cv2.INTER_AREA).astype(np.float32)
        cells = small.reshape(grid, 2, grid, 2, 3).transpose(0, 2, 1, 3, 4).reshape(grid, grid, 12)
        cells = cells + 1.0  # no zero vectors
        return (cells / np.linalg.norm(cells, axis=2, keepdims=True)).transpose(2, 0, 1).copy()


def fake_manifest(tmp_path: Path, sha: str = "a" * 64) -> mf.Manifest:
    data = {"profile": "lite", "models": {"saliency": {"file": "saliency.onnx", "sha256": sha}},
            "preprocess": {"saliency": {"backbone": "fake", "channels": 12, "single_size": 32, "stride": 4,
                                        "mean": [0, 0, 0], "std": [1, 1, 1]}}}
    return mf.Manifest(tmp_path, data)


def random_images(count: int, seed: int = 0, size: int = 32) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(f"good{i}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for i in range(count)]


# ---------------------------------------------------------------- memory


def test_coreset_never_exceeds_its_bound(tmp_path):
    manifest, extractor = fake_manifest(tmp_path), FakeExtractor()
    for capacity in (1, 5, 64, 100):
        memory = NormalMemory.from_images(extractor, manifest, random_images(9), MemorySettings(capacity=capacity))
        assert len(memory) == min(capacity, 9 * 64)
    memory = NormalMemory.empty(manifest, extractor, MemorySettings(capacity=40, slack=10))
    rng = np.random.default_rng(3)
    sizes = []
    for serial in range(30):  # a growing stream of additions of every size
        rows = unit_rows(rng, int(rng.integers(1, 50)), 12)
        memory.add(rows, serial, np.arange(len(rows)))
        sizes.append(len(memory))
        assert len(memory) <= 40 and memory.sources.shape == (len(memory), 2)
    assert max(sizes) == 40 and min(sizes[5:]) >= 30  # reductions go to capacity - slack


def test_build_from_many_images_pools_in_rounds(tmp_path, monkeypatch):
    import runtime.lineside.normal_memory as memory_module

    monkeypatch.setattr(memory_module, "BUILD_POOL_FACTOR", 2)  # reduce after every 2 x capacity features
    memory = NormalMemory.from_images(FakeExtractor(), fake_manifest(tmp_path), random_images(12),
                                      MemorySettings(capacity=50))
    assert len(memory) == 50 and sorted(set(memory.sources[:, 0])) != [] and memory.images[0] == "good0.png"


def test_memory_map_is_distance_to_nearest_good_feature(tmp_path):
    manifest, extractor = fake_manifest(tmp_path), FakeExtractor()
    images = random_images(3)
    memory = NormalMemory.from_images(extractor, manifest, images, MemorySettings(capacity=10_000))
    assert len(memory) == 3 * 64  # under capacity nothing is dropped
    seen = extractor.single_object_features(images[1][1])
    assert np.abs(memory.distance_grid(seen)).max() < 1e-6  # a good image's own features are in the memory
    new = extractor.single_object_features(random_images(1, seed=9)[0][1])
    expected = nearest_distance_twin(as_rows(new), memory.features).reshape(8, 8)
    np.testing.assert_allclose(memory.distance_grid(new), expected, atol=SEARCH_TOLERANCE)
    grids = memory.grids(extractor, random_images(1, seed=9)[0][1])
    assert grids.self_grid is None and np.array_equal(grids.grid, grids.memory_grid)  # blend 1: memory only
    half = NormalMemory(memory.binding, MemorySettings(blend=0.5), memory.features, memory.sources)
    grids = half.grids(extractor, random_images(1, seed=9)[0][1])
    np.testing.assert_allclose(grids.grid, 0.5 * grids.self_grid + 0.5 * grids.memory_grid, atol=1e-7)
    empty = NormalMemory.empty(manifest, extractor).grids(extractor, random_images(1, seed=9)[0][1])
    assert empty.memory_grid is None and np.array_equal(empty.grid, empty.self_grid)


def test_save_load_round_trip_and_damage(tmp_path):
    manifest, extractor = fake_manifest(tmp_path), FakeExtractor()
    memory = NormalMemory.from_images(extractor, manifest, random_images(4), MemorySettings(capacity=100, blend=0.5))
    sha = memory.save(tmp_path / "memory.npz")
    loaded = NormalMemory.load(tmp_path / "memory.npz")
    assert sha == loaded.content_sha256() == loaded.initial_sha256 == memory.content_sha256()
    np.testing.assert_array_equal(loaded.features, memory.features)
    np.testing.assert_array_equal(loaded.sources, memory.sources)
    assert loaded.settings == memory.settings and loaded.images == memory.images
    loaded.check_binding(manifest, extractor)  # same engines: accepted

    with np.load(tmp_path / "memory.npz") as data:  # change one feature, keep the recorded sha256
        arrays = {key: data[key] for key in data.files}
    arrays["features"][0, 0] += 0.5
    with open(tmp_path / "damaged.npz", "wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(MemoryFileError, match="fails its sha256 check"):
        NormalMemory.load(tmp_path / "damaged.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(MemoryFileError, match="not a memory file"):
        NormalMemory.load(tmp_path / "junk.npz")
    with pytest.raises(MemoryFileError, match="not found"):
        NormalMemory.load(tmp_path / "missing.npz")


def test_memory_for_other_engines_is_refused(tmp_path):
    extractor = FakeExtractor()
    memory = NormalMemory.from_images(extractor, fake_manifest(tmp_path), random_images(2), MemorySettings(capacity=50))
    memory.save(tmp_path / "memory.npz")
    loaded = NormalMemory.load(tmp_path / "memory.npz")
    with pytest.raises(MemoryFileError, match="built for other engines"):
        loaded.check_binding(fake_manifest(tmp_path, sha="b" * 64), extractor, tmp_path / "memory.npz")
    other = FakeExtractor(settings=FakeSettings(contrast="clahe"))
    with pytest.raises(MemoryFileError, match="other saliency settings"):
        loaded.check_binding(fake_manifest(tmp_path), other)


def test_settings_are_checked():
    for bad in (dict(capacity=0), dict(k=0), dict(blend=1.5), dict(projection=0), dict(capacity=4, slack=4)):
        with pytest.raises(ConfigError):
            MemorySettings(**bad).checked()
    with pytest.raises(ConfigError, match="warmup"):
        StreamSettings(warmup=0).checked()


# ---------------------------------------------------------------- streaming


def grids_with_spot(value: float = 1.0) -> SaliencyGrids:
    rng = np.random.default_rng(0)
    grid = np.tile(np.linspace(0, 0.1, 16, dtype=np.float32), (16, 1))  # smooth, highest at the right edge
    grid[5:7, 9:11] = value
    features = unit_rows(rng, 256, 12).T.reshape(12, 16, 16).copy()
    return SaliencyGrids(features, grid, grid, grid)


def test_guard_never_learns_near_a_suspicious_spot(tmp_path):
    stream = StreamingMemory.empty(fake_manifest(tmp_path), FakeExtractor(), 1000,
                                   StreamSettings(warmup=1, pixel_quantile=0.95, radius=2))
    keep = stream.learnable(grids_with_spot(), None, Thresholds())
    assert not keep[3:9, 7:13].any()  # the spot and 2 cells around it
    assert keep.sum() == 256 - 36  # the rest: nothing else is above the 95 % quantile (the edge column ties it)
    # with a pixel threshold, the anomaly map at image size guards cells too
    anomaly = np.zeros((64, 64), np.float32)
    anomaly[60:, 0:4] = 1.0
    keep = stream.learnable(grids_with_spot(), anomaly, Thresholds(pixel=0.5))
    assert not keep[13:, :3].any()


def test_image_gate(tmp_path):
    stream = StreamingMemory.empty(fake_manifest(tmp_path), FakeExtractor(), 1000, StreamSettings(warmup=3))
    events = [stream.observe(score, grids_with_spot(), None, Thresholds()) for score in (0.5, 0.4, 0.6)]
    assert all(e.reason.startswith("warm-up") and e.learned == 0 for e in events)
    assert stream.observe(0.9, grids_with_spot(), None, Thresholds()).learned == 0  # above the median
    assert stream.observe(0.3, grids_with_spot(), None, Thresholds()).learned > 0
    # with an image threshold the score must also be clearly (margin 10 %) below it
    assert stream.observe(0.29, grids_with_spot(), None, Thresholds(image=0.3)).learned == 0
    assert stream.observe(0.2, grids_with_spot(), None, Thresholds(image=0.3)).learned > 0
    assert stream.seen == 7 and stream.learned_parts == 2


def textured(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A tile-like surface: smooth grey noise."""
    noise = cv2.GaussianBlur(rng.normal(128, 40, (size, size)).astype(np.float32), (0, 0), 2)
    return np.repeat(np.clip(noise, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def with_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark scratch: the image and its defect mask."""
    image = image.copy()
    mask = np.zeros(image.shape[:2], np.uint8)
    x, y = rng.integers(20, 90, 2)
    cv2.line(mask, (int(x), int(y)), (int(x) + 25, int(y) + 18), 1, 5)
    image[mask > 0] = 15
    return image, mask > 0


@pytest.mark.parametrize("quantile", [0.5, 1.0])
def test_stream_keeps_defect_features_out(lite_engine_dir, quantile):
    """A constructed line: good tiles with 30 % scratched ones mixed in after the warm-up. Whatever
    the stream learns, no memory feature comes from a grid cell a scratch touches. With the image
    gate wide open (quantile 1) scratched parts do get learned: the position guard alone keeps
    their scratches out."""
    pipeline = Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", stream_memory=2048)
    pipeline.stream.settings = StreamSettings(warmup=4, window=16, quantile=quantile).checked()
    rng = np.random.default_rng(0)
    grid = pipeline.saliency.single_size // pipeline.saliency.stride
    defect_cells: dict[int, np.ndarray] = {}
    learned_defect_parts = 0
    for index in range(24):
        image = textured(rng)
        defective = index >= 4 and rng.random() < 0.3
        if defective:
            image, mask = with_defect(image, rng)
        result = pipeline(image)
        event = result.stream
        assert event["serial"] == index + 1
        if defective and event["learned"]:
            learned_defect_parts += 1
            cells = cv2.resize(mask.astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA) > 0
            defect_cells[event["memory_serial"]] = np.flatnonzero(cells)
    sources = pipeline.memory.sources
    assert pipeline.stream.learned_parts >= 4 and len(pipeline.memory) > 0
    if quantile == 1.0:
        assert learned_defect_parts >= 1  # else the position guard was not exercised
    for serial, cells in defect_cells.items():
        learned_cells = sources[sources[:, 0] == serial, 1]
        assert not np.isin(learned_cells, cells).any()
    # reset: back to the empty memory the stream started from
    pipeline.reset_memory()
    assert len(pipeline.memory) == 0 and pipeline.stream.seen == 0


def test_stream_state_saves_loads_and_resets(tmp_path):
    manifest, extractor = fake_manifest(tmp_path), FakeExtractor()
    start = NormalMemory.from_images(extractor, manifest, random_images(2), MemorySettings(capacity=300))
    stream = StreamingMemory(start, StreamSettings(warmup=1))
    for score in (0.5, 0.2, 0.1):
        stream.observe(score, grids_with_spot(), None, Thresholds())
    assert len(stream.memory) > 128
    stream.save(tmp_path / "stream.npz")
    again = StreamingMemory.load(tmp_path / "stream.npz")
    assert again.seen == 3 and list(again.scores) == [0.5, 0.2, 0.1] and again.settings == stream.settings
    np.testing.assert_array_equal(again.memory.features, stream.memory.features)
    stream.reset()
    assert len(stream.memory) == 128 and stream.seen == 0  # the memory it started from
    np.testing.assert_array_equal(stream.memory.features, start.features)
    with pytest.raises(ConfigError, match="more than --stream-memory"):
        StreamingMemory.load(tmp_path / "stream.npz", capacity=10)


# ---------------------------------------------------------------- with the real engines


def test_pipeline_with_memory(lite_engine_dir, data_dir, tmp_path):
    goods = sorted((data_dir / "mtd-mini" / "MT_Free" / "Imgs").glob("*.jpg"))
    defect = next((data_dir / "mtd-mini" / "MT_Crack" / "Imgs").glob("*.jpg"))
    # the memory path works on the reference saliency settings (the few-shot study's), not lite's tuned preset
    reference = {"saliency_preset": "reference"}
    plain = Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", options=reference)
    image = cv2.imread(str(defect))
    # the memory path computes the same self-similarity grid as the saliency extractor
    features, self_grid = single_object_grids(plain.saliency, image, 400, "farthest")
    np.testing.assert_array_equal(self_grid, plain.saliency.single_object_grid(image, 400, "farthest"))
    # an empty memory gives the zero-shot map exactly
    plain.memory = NormalMemory.empty(plain.manifest, plain.saliency)
    zero_shot = Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", options=reference)(image).anomaly_map
    np.testing.assert_array_equal(plain(image).anomaly_map, zero_shot)

    memory = NormalMemory.from_images(plain.saliency, plain.manifest, [(p.name, cv2.imread(str(p))) for p in goods],
                                      MemorySettings(capacity=2048))
    memory.save(tmp_path / "memory.npz")
    with Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", memory=tmp_path / "memory.npz") as pipe:
        result = pipe(image)
        expected = smooth_grid(nearest_distance_twin(as_rows(features), memory.features).reshape(self_grid.shape),
                               memory.settings.blur_sigma)
        np.testing.assert_allclose(result.anomaly_map, cv2.resize(expected, image.shape[1::-1]), atol=1e-5)
        good_score = pipe(cv2.imread(str(goods[0]))).pred_score
        assert good_score < result.pred_score  # a good part in the memory is quieter than a cracked one
        assert pipe.save_memory(tmp_path / "again.npz") == memory.content_sha256()
    # another saliency CNN (a manifest with another sha256) refuses the file
    manifest = json.loads((lite_engine_dir / "manifest.json").read_text())
    other = mf.Manifest(Path(lite_engine_dir), {**manifest, "models": {"saliency": {
        **manifest["models"]["saliency"], "sha256": "0" * 64}}})
    with pytest.raises(MemoryFileError, match="built for other engines"):
        NormalMemory.load(tmp_path / "memory.npz").check_binding(other, plain.saliency, "memory.npz")


def test_blend_map_for_several_objects(tmp_path):
    """object_count > 1: the multi-object map (image size) is blended with the resized memory map."""
    manifest, extractor = fake_manifest(tmp_path), FakeExtractor()
    memory = NormalMemory.from_images(extractor, manifest, random_images(2),
                                      MemorySettings(capacity=500, blend=0.5, blur_sigma=0.0))
    image = random_images(1, seed=5, size=48)[0][1]
    saliency = np.random.default_rng(0).uniform(0, 1, (48, 48)).astype(np.float32)
    grids: list = []
    blended = memory.blend_map(extractor, image, saliency, grids)
    memory_grid = memory.distance_grid(extractor.single_object_features(image))
    np.testing.assert_allclose(blended, 0.5 * saliency + 0.5 * cv2.resize(memory_grid, (48, 48)), atol=1e-6)
    assert len(grids) == 1 and grids[0].grid.shape == (8, 8) and grids[0].features.shape == (12, 8, 8)
    empty = NormalMemory.empty(manifest, extractor)
    assert empty.blend_map(extractor, image, saliency) is saliency  # nothing learned yet: unchanged


def test_memory_cli_reads_a_folder_of_good_parts(lite_engine_dir, data_dir, tmp_path, capsys):
    from runtime import memory as memory_cli

    out = tmp_path / "memory.npz"
    code = memory_cli.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd",
                            "--good", str(data_dir / "mtd-mini" / "MT_Free" / "Imgs"), "--capacity", "512",
                            "--out", str(out)])
    assert code == 0 and "512 features from 2 good images" in capsys.readouterr().err
    loaded = NormalMemory.load(out)
    assert sorted(loaded.images) == ["exp1_num_3786.jpg", "exp1_num_52659.jpg"]  # the .png masks are not parts
    assert loaded.settings.capacity == 512
