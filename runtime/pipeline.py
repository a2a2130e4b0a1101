"""The SAA+ pipeline object: built once (sessions, cached text features), called per image.

image -> detector boxes (P^L) -> property filter (P^P) -> SAM masks -> saliency (P^S)
-> rescore -> top-K fusion (P^C) -> anomaly map. The CLI, the Python API and the C ABI
all call this one object. With `lite` engines only the saliency map is computed.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from . import manifest as mf
from . import ops
from .config import PromptConfig, resolve_config
from .lineside.decision import Thresholds, decide, image_score
from .errors import EngineError, ImageError, SaaError
from .stages.fusion import fuse_masks, mean_inside_masks, rescore, top_k_indices
from .engine.host_memory import available_bytes, mask_bytes
from .image_io import to_bgr8
from .stages.mask_fusion import DeviceMasks, MaskFusion
from .stages.regions import OBJECT_PROMPT_INDEX, Region, box_iou, select_regions
from .engine.sessions import ENGINE_CLOCK, session_factory

WARM_UP_HW = (480, 640)  # the synthetic frame of Pipeline.warm_up: a common camera size
# With overlap, calls before this many full calls run their stages one after another: CUDA graphs
# are captured in the first two (onnxruntime runs a graph once, then captures it), and a capture
# must not share the device with another thread's launches.
OVERLAP_AFTER_CALLS = 3


@dataclass
class AnomalyResult:
    anomaly_map: np.ndarray  # float32 [H,W] (image size unless out_size was given)
    saliency_map: np.ndarray  # float32, same size
    regions: list[Region]  # defect regions that passed P^P, with final scores; in_top_k marks the fused ones
    object_regions: list[Region]
    saliency_only: bool
    notes: list[str] = field(default_factory=list)  # e.g. "no object box: whole image used as the object"
    timings_ms: dict[str, float] = field(default_factory=dict)
    engine_ms: dict[str, float] = field(default_factory=dict)  # per stage, the share spent inside onnxruntime runs
    pred_score: float | None = None  # max of the anomaly map at image size (runtime.lineside.decision)
    pred_label: int | None = None  # 1 NG / 0 OK: pred_score > image threshold; None without one
    pred_mask: np.ndarray | None = None  # bool, anomaly_map > pixel threshold; None without one
    stream: dict[str, Any] | None = None  # what the streaming memory did with this part
    image_shape: tuple[int, int] | None = None  # (H, W) of the input: the frame of boxes and mask areas
    random_weights: bool = False  # engines exported with --random-init: the map means nothing

    def regions_json(self) -> dict[str, Any]:
        return {
            **({"image_shape": list(self.image_shape)} if self.image_shape is not None else {}),
            "random_weights": self.random_weights,
            "pred_score": self.pred_score,
            "pred_label": self.pred_label,
            **({"stream": self.stream} if self.stream is not None else {}),
            "saliency_only": self.saliency_only,
            "notes": self.notes,
            "object_regions": [r.to_json() for r in self.object_regions],
            "regions": [r.to_json() for r in self.regions],
        }


class Pipeline:
    """SAA+ over one engines dir and one prompt config."""

    def __init__(self, manifest: mf.Manifest, config: PromptConfig, device: str = "cpu", threads: int = 0,
                 io_binding: bool | None = None, static_shapes: bool | None = None,
                 cuda_graphs: bool | None = None, overlap: bool | None = None,
                 device_canvas: bool | None = None) -> None:
        """io_binding: None: the GPU paths (tensors kept on the device between graphs, masks scored
        and fused there, the kNN as a graph) where `device` is a GPU; True forces them on the CPU
        provider (tests check them against the CPU paths); False turns them off.
        static_shapes: GroundingDINO's head reopened with this config's caption and token counts
        fixed (Detector.fix_head_shapes), SAM's decoder with decoder_chunk boxes a call
        (Segmenter.fix_box_count; GPU paths only). None: on a GPU, unless SAA_STATIC_SHAPES=0
        (for A/B runs).
        cuda_graphs: GroundingDINO's image graph and SAM's encoder, and with static_shapes also
        the head and SAM's decoder, capture CUDA graphs where onnxruntime allows it (needs the
        GPU paths); `cuda_graphs` then says per graph "captured" or why not. None: with --device cuda and SAA_CUDA_GRAPHS=1
        (off by default until measured on a GPU).
        overlap: SAM's image encoding and the one-object saliency run in a second thread while
        GroundingDINO's head runs (they need only the image): on a GPU their host work and kernels
        hide behind the head's ~150 ms of device time. SAM then encodes every image, boxes or not.
        Same results (tested); stage times then overlap, and `overlap_wait` is how long the main
        thread waited for them. No gain on a CPU, whose cores the head already fills. None:
        SAA_OVERLAP=1 (off by default until measured on a GPU).
        device_canvas: GroundingDINO's and SAM's input images are resized and normalised on the
        device by a built-in graph (runtime.engine.device_canvas: the same canvas to the bit), so the
        host uploads the uint8 image instead of preparing a float canvas. Needs the GPU paths.
        None: SAA_DEVICE_CANVAS=1 (off by default until measured on a GPU)."""
        self.manifest = manifest
        self.config = config
        self.device = device
        make_session = session_factory(device, threads)
        from .stages.saliency import SaliencyExtractor, preset_settings  # imported here: numba compiles on first import

        options = config.options
        # reference settings: memory, multi-object; off the CPU the one-object kNN runs on the GPU too
        gpu_paths = device != "cpu" if io_binding is None else io_binding
        if cuda_graphs is None:
            cuda_graphs = device == "cuda" and gpu_paths and os.environ.get("SAA_CUDA_GRAPHS", "0") == "1"
        if cuda_graphs and not gpu_paths:
            raise EngineError("CUDA graphs need the GPU paths (IO binding): io_binding=False turned them off")
        if device_canvas is None:
            device_canvas = gpu_paths and os.environ.get("SAA_DEVICE_CANVAS", "0") == "1"
        if device_canvas and not gpu_paths:
            raise EngineError("the device canvas needs the GPU paths (IO binding): io_binding=False turned them off")
        knn_device = ("cpu" if device == "cpu" else "cuda") if gpu_paths else None
        self.saliency = SaliencyExtractor(manifest, make_session, knn_device=knn_device)
        # Zero-shot one-object P^S: the profile's preset (lite: the tuned map), sharing the session.
        self.zero_shot_saliency = self.saliency.with_settings(
            preset_settings(manifest, options.saliency_preset, options.saliency_n, options.saliency_mode))
        positions = (self.zero_shot_saliency.single_size // self.saliency.stride) ** 2
        if options.saliency_n is not None and options.saliency_n >= positions:
            warnings.warn(f"saliency_n {options.saliency_n} is at least the {positions} positions of the saliency "
                          "grid: each position's mean takes all its distances (as the reference's slice does)",
                          stacklevel=3)
        # Line side (runtime.lineside.attach.attach sets them): thresholds, normal memory, streaming memory.
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
        if overlap is None:
            overlap = os.environ.get("SAA_OVERLAP", "0") == "1"
        self.overlap = bool(overlap) and not self.saliency_only
        self._side: ThreadPoolExecutor | None = None  # the overlap's second thread, started on first use
        self._full_calls = 0
        if not self.saliency_only:
            from .stages.detector import Detector
            from .stages.segmenter import Segmenter

            if manifest.models.get(mf.GDINO_HEAD, {}).get("source", {}).get("custom_ops"):
                ops.check_gpu_kernel(device)  # a fused head on a GPU: its CUDA kernel checked once per process
            self.detector = Detector(manifest, make_session, io_binding=io_binding, cuda_graphs=cuda_graphs,
                                     device_canvas=device_canvas)
            self.segmenter = Segmenter(manifest, make_session, io_binding=io_binding, cuda_graphs=cuda_graphs,
                                       device_canvas=device_canvas)
            if self.segmenter.masks_on_device:
                self.mask_fusion = MaskFusion(self.segmenter.mask_device)
            self.defect_prompts = config.all_defect_prompts()
            self.captions = [config.object_caption] + [p.text for p in self.defect_prompts]
            # Text side once per config: every image reuses these features.
            start = time.perf_counter()
            self.text_features = self.detector.encode_text(self.captions, joined=options.joined_captions)
            self.text_ms = (time.perf_counter() - start) * 1000.0
            if static_shapes is None:
                static_shapes = device != "cpu" and os.environ.get("SAA_STATIC_SHAPES", "1") != "0"
            if static_shapes:
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
             config: str | Path | None = None, device: str = "cpu", threads: int = 0,
             options: dict[str, Any] | None = None, verify_hashes: bool = True,
             calibration: str | Path | None = None, memory: Any = None, stream_memory: int | None = None,
             image_threshold: float | None = None, pixel_threshold: float | None = None,
             warm_up: bool = False) -> "Pipeline":
        """calibration: file from runtime.calibrate (thresholds; refused for other engines/config/memory).
        memory: normal memory file or NormalMemory (runtime.memory). stream_memory: capacity of a memory
        that learns from parts judged normal (runtime.lineside.stream). image/pixel_threshold override the calibration's.
        warm_up: one call on a synthetic frame before returning (Pipeline.warm_up)."""
        manifest = mf.load_manifest(engine_dir, verify_hashes=verify_hashes)
        prompt_config = resolve_config(dataset, category, config, options)
        pipeline = cls(manifest, prompt_config, device=device, threads=threads)
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
        if self._side is not None:
            self._side.shutdown(wait=True)
            self._side = None
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
                masks, mask_of_region = self._masks(regions, (height, width), on_device=self.mask_fusion is not None)
                self._fuse(regions, masks, mask_of_region, np.zeros((height, width), np.float32))
        return time.perf_counter() - start

    def _infer(self, image: np.ndarray, out_size: int | tuple[int, int] | None, learn: bool) -> AnomalyResult:
        if self.saliency is None:
            raise SaaError("pipeline is closed")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        grids: list = []  # this call's memory grids (a local: calls may run in several threads)
        with _timed(timings, "preprocess"):
            image = to_bgr8(image)
        if self.saliency_only:
            with _timed(timings, "saliency"):
                saliency = self._single_saliency(image, grids)
            result = AnomalyResult(saliency.copy(), saliency, [], [], True,
                                   ["lite engines: saliency-only anomaly map (no GroundingDINO/SAM)"], timings)
        else:
            with self._full_lock:
                result = self._full(image, timings, grids)
        result.image_shape = (int(image.shape[0]), int(image.shape[1]))
        if self.random_weights:
            result.random_weights = True
            result.notes.insert(0, RANDOM_WEIGHTS_NOTE)
        result.pred_score = image_score(result.anomaly_map)  # at image size, whatever out_size
        if learn and self.stream is not None and grids:
            with _timed(timings, "memory_update"):
                result.stream = self.stream.observe(result.pred_score, grids[0], result.anomaly_map,
                                                    self.thresholds).to_json()
        if out_size is not None:
            result.anomaly_map = _resize_map(result.anomaly_map, out_size)
            result.saliency_map = _resize_map(result.saliency_map, out_size)
        decision = decide(result.anomaly_map, self.thresholds, result.pred_score)
        result.pred_label, result.pred_mask = decision.pred_label, decision.pred_mask
        timings["end_to_end"] = (time.perf_counter() - start) * 1000.0
        result.timings_ms = {k: v for k, v in timings.items() if not k.startswith(ENGINE)}
        result.engine_ms = {k[len(ENGINE):]: v for k, v in timings.items() if k.startswith(ENGINE)}
        result.engine_ms["end_to_end"] = sum(result.engine_ms.values())
        return result

    def _single_saliency(self, image: np.ndarray, grids: list | None = None) -> np.ndarray:
        options = self.config.options
        if self.memory is None:
            return self.zero_shot_saliency.single_object_saliency(image)
        # With a memory: its distance map (blended with the self-similarity, runtime.memory) is P^S.
        found = self.memory.grids(self.saliency, image, n=options.saliency_n, mode=options.saliency_mode)
        if grids is not None:
            grids.append(found)
        return cv2.resize(found.grid, (image.shape[1], image.shape[0]))  # bilinear, as the saliency

    def _full(self, image: np.ndarray, timings: dict[str, float], grids: list | None = None) -> AnomalyResult:
        height, width = image.shape[:2]
        notes: list[str] = [JOINED_CAPTIONS_NOTE] if self.config.options.joined_captions else []
        with _timed(timings, "detector_image"):
            # The reference gives GroundingDINO RGB, and SAM / the CNN the BGR array as if RGB.
            image_features = self.detector.encode_image(np.ascontiguousarray(image[:, :, ::-1]))
        multi = self.config.object_count > 1
        side = self._start_side_stages(image, timings, grids, saliency_too=not multi)
        try:
            objects, defects = self._detect(image_features, (height, width), timings, notes)
        except BaseException:
            if side is not None:
                wait([side])  # the second thread is done with the image before the error leaves the lock
            raise
        side_saliency = None
        if side is not None:
            with _timed(timings, "overlap_wait"):
                side_saliency = side.result()  # raises the second thread's error
        elif defects or (multi and len(objects) > 1):
            with _timed(timings, "sam_encoder"):
                self.segmenter.set_image(image)
        with _timed(timings, "sam_decoder"):
            defect_masks, mask_of_defect = self._masks(defects, (height, width), on_device=self.mask_fusion is not None)
            object_masks = None
            if multi and len(objects) > 1:
                masks, mask_of_object = self._masks(objects, (height, width))
                # one per object region, as the reference's search takes them
                object_masks = masks if len(masks) == len(objects) else masks[mask_of_object]

        with _timed(timings, "saliency"):
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

        with _timed(timings, "fusion"):
            anomaly = self._fuse(defects, defect_masks, mask_of_defect, saliency)
        return AnomalyResult(anomaly, saliency, defects, objects, False, notes, timings)

    def _start_side_stages(self, image: np.ndarray, timings: dict[str, float], grids: list,
                           saliency_too: bool) -> Future | None:
        """With overlap (past the calls that capture CUDA graphs): SAM's encoding, and the one-object
        saliency where `saliency_too`, submitted to the second thread; None otherwise."""
        self._full_calls += 1
        if not self.overlap or self._full_calls <= OVERLAP_AFTER_CALLS:
            return None
        if self._side is None:
            self._side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saa-overlap")
        return self._side.submit(self._side_stages, image, timings, grids, saliency_too)

    def _side_stages(self, image: np.ndarray, timings: dict[str, float], grids: list,
                     saliency_too: bool) -> np.ndarray | None:
        # Its own stage keys in the shared dict; the engine clock is per thread.
        with _timed(timings, "sam_encoder"):
            self.segmenter.set_image(image)
        if not saliency_too:
            return None
        with _timed(timings, "saliency"):
            return self._single_saliency(image, grids)

    def _detect(self, image_features: Any, image_hw: tuple[int, int], timings: dict[str, float],
                notes: list[str]) -> tuple[list[Region], list[Region]]:
        """GroundingDINO's head over every caption, then the object and defect regions (P^P)."""
        options = self.config.options
        height, width = image_hw
        with _timed(timings, "detector_prompts"):
            detections = self.detector.detect(image_features, self.text_features)

        with _timed(timings, "regions"):
            objects = self._regions(detections[0], None, OBJECT_PROMPT_INDEX, self.config.object_prompt,
                                    (height, width), 0.0, self.config.object_max_area)
            if objects:
                object_area = float(max(r.box_area for r in objects))
            else:
                object_area = 1.0
                notes.append("no object box passed the filter: the whole image is taken as the object (object area 1)")
            max_area = float(np.float32(object_area) * np.float32(self.config.defect_area_ratio))
            defects: list[Region] = []
            for index, (prompt, detection) in enumerate(zip(self.defect_prompts, detections[1:])):
                defects += self._regions(detection, prompt.exclude, index, prompt.text, (height, width), 0.0, max_area)
            if options.object_iou_threshold is not None and objects and defects:
                iou = box_iou(np.array([r.box for r in defects]), np.array([r.box for r in objects])).max(axis=1)
                defects = [r for r, v in zip(defects, iou) if v >= options.object_iou_threshold]
        return objects, defects

    def _regions(self, detection, exclude, index, prompt, image_hw, min_area, max_area) -> list[Region]:
        options = self.config.options
        return select_regions(detection.logits, detection.boxes, detection.phrase_of, exclude, index, prompt, image_hw,
                              options.box_threshold, options.text_threshold, min_area, max_area,
                              options.max_boxes_per_prompt)

    def _masks(self, regions: list[Region], image_hw: tuple[int, int],
               on_device: bool = False) -> tuple[np.ndarray | DeviceMasks, np.ndarray]:
        """(SAM's masks of the regions' distinct boxes, each region's index into them): regions of
        one box share a decode (joined captions keep a query for every caption it passes)."""
        if not regions:
            return np.zeros((0, *image_hw), dtype=bool), np.zeros(0, np.int64)
        boxes, mask_of_region = distinct_boxes(regions)
        if not on_device:
            _check_mask_memory(len(boxes), image_hw)
        masks = self.segmenter.predict_boxes(boxes, chunk=self.config.options.decoder_chunk, on_device=on_device)
        return masks, mask_of_region

    def _fuse(self, regions: list[Region], masks: np.ndarray | DeviceMasks, mask_of_region: np.ndarray,
              saliency: np.ndarray) -> np.ndarray:
        options = self.config.options
        if not regions:
            return np.zeros(saliency.shape, np.float32)
        on_device = isinstance(masks, DeviceMasks)
        means, areas = self.mask_fusion.mean_inside_masks(saliency, masks) if on_device else mean_inside_masks(saliency, masks)
        means, areas = means[mask_of_region], areas[mask_of_region]
        scores = rescore(np.array([r.detector_score for r in regions]), means, areas, options.rescore_gain)
        for region, mean, area, score in zip(regions, means, areas, scores):
            region.saliency, region.mask_area, region.score = float(mean), int(area), float(score)
        keep = top_k_indices(scores, self.config.top_k)
        for index in keep:
            regions[index].in_top_k = True
        if on_device:
            return self.mask_fusion.fuse_masks(masks, mask_of_region[keep], scores[keep], options.fusion_plus_one)
        return fuse_masks(masks[mask_of_region[keep]], scores[keep], options.fusion_plus_one).astype(np.float32)


RANDOM_WEIGHTS_NOTE = ("random weights: these engines were exported with --random-init (for timing and tests); "
                       "their maps, boxes and scores mean nothing")
JOINED_CAPTIONS_NOTE = ("joined_captions: GroundingDINO ran once on all the captions joined, not once per caption "
                        "as the reference algorithm does")


def distinct_boxes(regions: list[Region]) -> tuple[np.ndarray, np.ndarray]:
    """(the regions' distinct boxes, float32 [m, 4] in first-seen order; each region's row in them)."""
    boxes = np.array([r.box for r in regions], dtype=np.float32).reshape(-1, 4)
    _, first, inverse = np.unique(boxes, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # np.unique sorts the rows; SAM gets them in the regions' order
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return boxes[first[order]], rank[inverse.reshape(-1)].astype(np.int64)


def _check_mask_memory(count: int, image_hw: tuple[int, int]) -> None:
    """ImageError when `count` image-size masks would not fit in the host memory left: the
    process would otherwise be killed by the kernel without a word (a batch loses every image)."""
    need, available = mask_bytes(count, image_hw), available_bytes()
    if available is not None and need > available:
        raise ImageError(
            f"{count} regions at {image_hw[0]}x{image_hw[1]} need about {need / 2**30:.1f} GiB of masks, "
            f"more than the {available / 2**30:.1f} GiB of memory left: downscale the image or lower "
            "max_boxes_per_prompt in the config's options"
        )


def _resize_map(values: np.ndarray, out_size: int | tuple[int, int]) -> np.ndarray:
    height, width = (out_size, out_size) if isinstance(out_size, int) else out_size
    if height < 1 or width < 1:
        raise ImageError(f"output size {out_size} is not positive")
    return cv2.resize(values.astype(np.float32), (int(width), int(height)))


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Adds the stage's wall time to timings[stage], and its onnxruntime share to timings[ENGINE + stage]."""
    start, engine_start = time.perf_counter(), ENGINE_CLOCK.ms
    yield
    timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - start) * 1000.0
    timings[ENGINE + stage] = timings.get(ENGINE + stage, 0.0) + ENGINE_CLOCK.ms - engine_start


ENGINE = "engine:"  # prefix of the engine shares while a call collects them; split off into AnomalyResult.engine_ms
