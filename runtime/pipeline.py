"""The SAA+ pipeline object: built once (sessions, cached text features), called per image.

image -> detector boxes (P^L) -> property filter (P^P) -> SAM masks -> saliency (P^S)
-> rescore -> top-K fusion (P^C) -> anomaly map. The CLI, the Python API and the C ABI
all call this one object. With `lite` engines only the saliency map is computed.
Each step's rules live in its stage (runtime/stages/); this module holds their order.
"""
from __future__ import annotations

import threading
import time
import warnings
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import manifest as mf
from .config import PromptConfig, resolve_config
from .engine.clock import split_engine_share, timed
from .engine.overlap import SideThread
from .engine.sessions import SessionFactory, check_gpu_kernel
from .errors import EngineError, ImageError, SaaError
from .image_io import to_bgr8
from .lineside.decision import Thresholds, decide, image_score
from .result import JOINED_CAPTIONS_NOTE, LITE_NOTE, RANDOM_WEIGHTS_NOTE, AnomalyResult
from .settings import EngineSettings
from .stages.fusion import fuse_regions
from .stages.mask_fusion import MaskFusion
from .stages.regions import Region, detected_regions

WARM_UP_HW = (480, 640)  # the synthetic frame of Pipeline.warm_up: a common camera size

__all__ = ["AnomalyResult", "JOINED_CAPTIONS_NOTE", "Pipeline", "RANDOM_WEIGHTS_NOTE"]


class Pipeline:
    """SAA+ over one engines dir and one prompt config, run as one EngineSettings says."""

    def __init__(self, manifest: mf.Manifest, config: PromptConfig, settings: EngineSettings | None = None,
                 **switches: Any) -> None:
        """settings: how the engines run (runtime.settings.EngineSettings; None: from the keyword
        switches, e.g. device="cuda", cuda_graphs=True, and the environment for the rest)."""
        self.manifest = manifest
        self.config = config
        self.settings = _settings(settings, switches).resolved()
        self.device = self.settings.device
        make_session = SessionFactory(self.settings)
        from .stages.saliency import SaliencyExtractor, preset_settings  # imported here: numba compiles on first import

        options = config.options
        # reference settings: memory, multi-object; with the GPU paths the one-object kNN runs on the device too
        knn_device = ("cpu" if self.device == "cpu" else "cuda") if self.settings.gpu_paths else None
        self.saliency = SaliencyExtractor(manifest, make_session, knn_device=knn_device, engine=self.settings)
        # Zero-shot one-object P^S: the profile's preset (lite: the tuned map), sharing the session.
        self.zero_shot_saliency = self.saliency.with_settings(
            preset_settings(manifest, options.saliency_preset, options.saliency_n, options.saliency_mode))
        positions = (self.zero_shot_saliency.single_size // self.saliency.stride) ** 2
        if options.saliency_n is not None and options.saliency_n >= positions:
            warnings.warn(f"saliency_n {options.saliency_n} is at least the {positions} positions of the saliency "
                          "grid: each position's mean takes all its distances (as the reference's slice does)",
                          stacklevel=3)
        # Line side (runtime.lineside.attach sets them): thresholds, normal memory, streaming memory.
        self.thresholds = Thresholds()
        self.memory = self.stream = self.calibration = None
        self.saliency_only = manifest.profile == "lite"
        self.random_weights = manifest.random_init
        self.detector = self.segmenter = None
        self.static_shapes_refused: str | None = None  # why onnxruntime would not open a fixed-shape session
        # The detector's and SAM's runs keep per-image state (SAM's embedding between set_image and
        # the box prompts, the IO bindings on a GPU): one image at a time goes through them.
        # Saliency-only (lite) calls share nothing mutable and run concurrently.
        self._full_lock = threading.Lock()
        self.mask_fusion: MaskFusion | None = None  # set where the masks stay on the device
        self.captions: list[str] = []
        self.overlap = self.settings.overlap and not self.saliency_only
        # Why the fused head's op runs on the CPU on a GPU (its CUDA kernel disagreed with the CPU
        # kernel or failed), else None: results files report it.
        self.ops_fallback: str | None = None
        self._side = SideThread(self.overlap)
        if not self.saliency_only:
            self._open_full(make_session)

    def _open_full(self, make_session: SessionFactory) -> None:
        from .stages.detector import Detector
        from .stages.segmenter import Segmenter

        settings, options = self.settings, self.config.options
        if self.manifest.models.get(mf.GDINO_HEAD, {}).get("source", {}).get("custom_ops"):
            # A fused head on a GPU: its CUDA kernel checked once per process; where it is wrong, the
            # engines open with the op library's CPU build instead (a warning says so).
            checked, self.ops_fallback = check_gpu_kernel(settings)
            if checked is not settings:
                settings = self.settings = checked
                make_session = SessionFactory(checked)
        stage_switches = {"io_binding": settings.io_binding, "cuda_graphs": settings.cuda_graphs,
                          "device_canvas": settings.device_canvas}
        self.detector = Detector(self.manifest, make_session, **stage_switches)
        self.segmenter = Segmenter(self.manifest, make_session, **stage_switches)
        if self.segmenter.masks_on_device:
            self.mask_fusion = MaskFusion(self.segmenter.mask_device, settings)
        self.defect_prompts = self.config.all_defect_prompts()
        self.captions = [self.config.object_caption] + [p.text for p in self.defect_prompts]
        # Text side once per config: every image reuses these features.
        start = time.perf_counter()
        self.text_features = self.detector.encode_text(self.captions, joined=options.joined_captions)
        self.text_ms = (time.perf_counter() - start) * 1000.0
        if settings.static_shapes:
            try:
                self.detector.fix_head_shapes(self.text_features)
                self.segmenter.fix_box_count(options.decoder_chunk)
            except EngineError as err:  # the dynamic-shape sessions instead: same results, slower
                self.static_shapes_refused = str(err)
        # Both open now where nothing fixed them: a broken engine fails here, not on the first image.
        self.detector.head_session()
        self.segmenter.decoder_session()

    @property
    def cuda_graphs(self) -> dict[str, str]:
        """Per graph asked to capture CUDA graphs: "captured", or onnxruntime's reason why not."""
        if self.detector is None:
            return {}
        return {**self.detector.cuda_graphs, **self.segmenter.cuda_graphs}

    @classmethod
    def open(cls, engine_dir: str | Path, dataset: str | None = None, category: str | None = None,
             config: str | Path | None = None, device: str | None = None, threads: int | None = None,
             options: dict[str, Any] | None = None, verify_hashes: bool = True,
             calibration: str | Path | None = None, memory: Any = None, stream_memory: int | None = None,
             image_threshold: float | None = None, pixel_threshold: float | None = None,
             warm_up: bool = False, settings: EngineSettings | None = None, **switches: Any) -> "Pipeline":
        """device, threads and the keyword switches (cuda_graphs=True, ...): EngineSettings fields,
        over `settings` where given, else over the environment (runtime.settings).
        calibration: file from runtime.calibrate (thresholds; refused for other engines/config/memory).
        memory: normal memory file or NormalMemory (runtime.memory). stream_memory: capacity of a memory
        that learns from parts judged normal (runtime.lineside.stream). image/pixel_threshold override the calibration's.
        warm_up: one call on a synthetic frame before returning (Pipeline.warm_up)."""
        engine_settings = _settings(settings, {"device": device, "threads": threads, **switches})
        manifest = mf.load_manifest(engine_dir, verify_hashes=verify_hashes)
        prompt_config = resolve_config(dataset, category, config, options)
        pipeline = cls(manifest, prompt_config, engine_settings)
        if calibration is not None or memory is not None or stream_memory is not None \
                or image_threshold is not None or pixel_threshold is not None:
            from .lineside.attach import attach

            attach(pipeline, calibration, memory, stream_memory, image_threshold, pixel_threshold)
        if warm_up:
            pipeline.warm_up()
        return pipeline

    def set_thresholds(self, image: float | None = None, pixel: float | None = None) -> None:
        """Image and pixel thresholds (None: off), in the anomaly map's units."""
        self.thresholds = Thresholds(image, pixel).checked()

    def reset_memory(self) -> None:
        """The memory back to how it was opened (a streaming memory forgets what it learned)."""
        if self.stream is not None:
            self.stream.reset()
        elif self.memory is not None:
            self.memory.reset()

    def save_memory(self, path: str | Path) -> str:
        """Write the memory (with a stream's state) to an .npz; returns its content sha256."""
        if self.memory is None:
            raise SaaError("this pipeline has no memory to save (open it with memory= or stream_memory=)")
        return self.stream.save(path) if self.stream is not None else self.memory.save(path)

    def close(self) -> None:
        self._side.close()
        self.detector = self.segmenter = self.saliency = self.mask_fusion = None

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, image: np.ndarray, out_size: int | tuple[int, int] | None = None) -> AnomalyResult:
        return self._infer(image, out_size, learn=True)

    def warm_up(self, image_hw: tuple[int, int] = WARM_UP_HW) -> float:
        """One call on a synthetic frame, so that the first real part is not the slowest (numba
        loads its compiled kernels, onnxruntime sizes its arenas, a GPU picks its algorithms and
        captures its CUDA graphs); returns the seconds it took. A streaming memory learns nothing
        from it. SAM, the mask upscaling and the fusion also run on a box in the middle of the
        frame, which trained weights would find no defect in. Call it before serving parts from
        several threads."""
        start = time.perf_counter()
        height, width = image_hw
        frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        self._infer(frame, None, learn=False)
        if self.segmenter is not None:
            box = (width / 4, height / 4, 3 * width / 4, 3 * height / 4)
            regions = [Region(box, 0.5, "", 0, "", 0.25)]
            with self._full_lock:
                self.segmenter.set_image(frame)
                self._fuse(regions, *self._masks(regions, (height, width), on_device=self.mask_fusion is not None),
                           np.zeros((height, width), np.float32))
        return time.perf_counter() - start

    def _infer(self, image: np.ndarray, out_size: int | tuple[int, int] | None, learn: bool) -> AnomalyResult:
        if self.saliency is None:
            raise SaaError("pipeline is closed")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        grids: list = []  # this call's memory grids (a local: calls may run in several threads)
        with timed(timings, "preprocess"):
            image = to_bgr8(image)
        if self.saliency_only:
            with timed(timings, "saliency"):
                saliency = self._single_saliency(image, grids)
            result = AnomalyResult(saliency.copy(), saliency, [], [], True, [LITE_NOTE], timings)
        else:
            with self._full_lock:
                result = self._full(image, timings, grids)
        result.image_shape = (int(image.shape[0]), int(image.shape[1]))
        if self.random_weights:
            result.random_weights = True
            result.notes.insert(0, RANDOM_WEIGHTS_NOTE)
        result.pred_score = image_score(result.anomaly_map)  # at image size, whatever out_size
        if learn and self.stream is not None and grids:
            with timed(timings, "memory_update"):
                result.stream = self.stream.observe(result.pred_score, grids[0], result.anomaly_map,
                                                    self.thresholds).to_json()
        if out_size is not None:
            result.anomaly_map = _resize_map(result.anomaly_map, out_size)
            result.saliency_map = _resize_map(result.saliency_map, out_size)
        decision = decide(result.anomaly_map, self.thresholds, result.pred_score)
        result.pred_label, result.pred_mask = decision.pred_label, decision.pred_mask
        timings["end_to_end"] = (time.perf_counter() - start) * 1000.0
        result.timings_ms, result.engine_ms = split_engine_share(timings)
        return result

    def _single_saliency(self, image: np.ndarray, grids: list | None = None) -> np.ndarray:
        options = self.config.options
        if self.memory is None:
            return self.zero_shot_saliency.single_object_saliency(image)
        # With a memory: its distance map (blended with the self-similarity, runtime.lineside.normal_memory) is P^S.
        found = self.memory.grids(self.saliency, image, n=options.saliency_n, mode=options.saliency_mode)
        if grids is not None:
            grids.append(found)
        return cv2.resize(found.grid, (image.shape[1], image.shape[0]))  # bilinear, as the saliency

    def _full(self, image: np.ndarray, timings: dict[str, float], grids: list | None = None) -> AnomalyResult:
        height, width = image.shape[:2]
        notes: list[str] = [JOINED_CAPTIONS_NOTE] if self.config.options.joined_captions else []
        with timed(timings, "detector_image"):
            # The reference gives GroundingDINO RGB, and SAM / the CNN the BGR array as if RGB.
            image_features = self.detector.encode_image(np.ascontiguousarray(image[:, :, ::-1]))
        difference = image_features.difference()  # not as the reference feeds GroundingDINO: said in the notes
        if difference is not None:
            notes.append(difference)
        multi = self.config.object_count > 1
        side = self._side.submit(self._side_stages, image, timings, grids, not multi)
        try:
            with timed(timings, "detector_prompts"):
                detections = self.detector.detect(image_features, self.text_features)
            with timed(timings, "regions"):
                objects, defects = detected_regions(detections, self.config, (height, width), notes)
        except BaseException:
            if side is not None:
                wait([side])  # the second thread is done with the image before the error leaves the lock
            raise
        side_saliency = None
        if side is not None:
            with timed(timings, "overlap_wait"):
                side_saliency = side.result()  # raises the second thread's error
        elif defects or (multi and len(objects) > 1):
            with timed(timings, "sam_encoder"):
                self.segmenter.set_image(image)
        with timed(timings, "sam_decoder"):
            defect_masks, mask_of_defect = self._masks(defects, (height, width), on_device=self.mask_fusion is not None)
            object_masks = None
            if multi and len(objects) > 1:
                masks, mask_of_object = self._masks(objects, (height, width))
                # one per object region, as the reference's search takes them
                object_masks = masks if len(masks) == len(objects) else masks[mask_of_object]

        with timed(timings, "saliency"):
            if multi and object_masks is not None:
                saliency = self.saliency.multi_object_saliency(image, object_masks)
                if self.memory is not None:
                    saliency = self.memory.blend_map(self.saliency, image, saliency, grids)
            elif side_saliency is not None:
                saliency = side_saliency
            else:
                if multi:
                    notes.append("fewer than two object masks: single-object saliency used")
                saliency = self._single_saliency(image, grids)

        with timed(timings, "fusion"):
            anomaly = self._fuse(defects, defect_masks, mask_of_defect, saliency)
        return AnomalyResult(anomaly, saliency, defects, objects, False, notes, timings, exact=difference is None,
                             exact_detector_hw=None if difference is None else image_features.reference_hw)

    def _side_stages(self, image: np.ndarray, timings: dict[str, float], grids: list,
                     saliency_too: bool) -> np.ndarray | None:
        """With overlap: SAM's encoding, and the one-object saliency where `saliency_too`, in the
        second thread (its own stage keys in the shared dict; the engine clock is per thread)."""
        with timed(timings, "sam_encoder"):
            self.segmenter.set_image(image)
        if not saliency_too:
            return None
        with timed(timings, "saliency"):
            return self._single_saliency(image, grids)

    def _masks(self, regions: list[Region], image_hw: tuple[int, int], on_device: bool = False) -> tuple[Any, np.ndarray]:
        return self.segmenter.region_masks(regions, image_hw, self.config.options.decoder_chunk, on_device)

    def _fuse(self, regions: list[Region], masks: Any, mask_of_region: np.ndarray, saliency: np.ndarray) -> np.ndarray:
        return fuse_regions(regions, masks, mask_of_region, saliency, self.config.options, self.config.top_k,
                            self.mask_fusion)


def _settings(settings: EngineSettings | None, switches: dict[str, Any]) -> EngineSettings:
    """`settings` with the given switches (None values: not given) changed, or, without one, the
    switches over the environment (EngineSettings.from_environment)."""
    given = {key: value for key, value in switches.items() if value is not None}
    if settings is None:
        return EngineSettings.from_environment(**given)
    return settings.with_changes(**given) if given else settings


def _resize_map(values: np.ndarray, out_size: int | tuple[int, int]) -> np.ndarray:
    height, width = (out_size, out_size) if isinstance(out_size, int) else out_size
    if height < 1 or width < 1:
        raise ImageError(f"output size {out_size} is not positive")
    return cv2.resize(values.astype(np.float32), (int(width), int(height)))
