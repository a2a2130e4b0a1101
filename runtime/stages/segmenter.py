"""SAM as the reference runs it: encode the image once, then boxes -> masks.

The image is given as the caller wants SAM to see it (the reference passes its
BGR array as if it were RGB; that choice belongs to the pipeline, not here).
Pre- and post-processing follow segment-anything's ResizeLongestSide,
Sam.preprocess and Sam.postprocess_masks; the two graphs hold only the
networks (see export/sam.py).
"""
from __future__ import annotations

from typing import Any, Callable

import cv2
import numpy as np
import onnxruntime as ort

from ..engine.device_canvas import DeviceCanvas
from ..engine.host_memory import check_mask_memory
from ..errors import EngineError, ImageError, engine_failure
from ..manifest import SAM_DECODER, SAM_ENCODER, Manifest
from .mask_fusion import DeviceMasks
from .mask_graph import mask_session, upscale_masks_graph
from .regions import Region, distinct_boxes
from ..engine.pixels import normalised_canvas
from ..engine.resize import longest_side_shape, resize_like_pil
from ..engine.runners import DeviceRunner, open_session, runner_for

# Graph I/O names, shared with export/sam.py.
ENCODER_INPUT = "image"
ENCODER_OUTPUT = "image_embeddings"
DECODER_INPUTS = ("image_embeddings", "boxes")
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")

PREPROCESS_KEYS = ("image_size", "mask_size", "pixel_mean", "pixel_std", "mask_threshold")
SMALLEST_FIXED_BOXES = 8  # the smallest fixed-count decoder below the config's chunk (fix_box_count)


def fixed_box_counts(most: int, smallest: int = SMALLEST_FIXED_BOXES) -> tuple[int, ...]:
    """The box counts fixed-count decoders are opened for, up to `most` (the config's chunk):
    doublings of `smallest` below it, then `most` itself (32: 8, 16, 32; 64: 8, 16, 32, 64;
    48: 8, 16, 32, 48; 5: 5). A chunk takes the smallest that fits, so a call decodes fewer than
    twice its boxes (or `smallest`), not always `most`."""
    counts, size = [], smallest
    while size < most:
        counts.append(size)
        size *= 2
    return (*counts, most)


def upscale_mask_logits(
    low_res: np.ndarray, input_size: tuple[int, int], original_size: tuple[int, int], image_size: int
) -> np.ndarray:
    """Sam.postprocess_masks for one [m, m] logit map: -> float32 [H, W] logits.

    Bilinear to image_size, crop the padding, bilinear to the original size: both
    steps as F.interpolate(mode="bilinear", align_corners=False), which for these
    sizes is what cv2.INTER_LINEAR computes on float32 (half-pixel centres, edge clamp).
    """
    logits = np.ascontiguousarray(low_res, dtype=np.float32)
    full = cv2.resize(logits, (image_size, image_size), interpolation=cv2.INTER_LINEAR)
    cropped = np.ascontiguousarray(full[: input_size[0], : input_size[1]])
    height, width = original_size
    if cropped.shape == (height, width):
        return cropped
    return cv2.resize(cropped, (width, height), interpolation=cv2.INTER_LINEAR)


class Segmenter:
    """set_image() once per image, predict_boxes() any number of times."""

    def __init__(self, manifest: Manifest, make_session: Callable[..., Any], io_binding: bool | None = None,
                 cuda_graphs: bool = False, device_canvas: bool = False) -> None:
        """io_binding: see runtime.engine.runners.runner_for (None: on a GPU the image embedding stays
        there between the encoder and every decoder call). cuda_graphs (with IO binding, a
        session factory of runtime.engine.sessions): the encoder captures a CUDA graph where onnxruntime
        allows it; `cuda_graphs` then says "captured" or why not. device_canvas (with IO
        binding): the image's resize and normalisation run on the device (runtime.engine.device_canvas)."""
        config = manifest.preprocess_section("sam", PREPROCESS_KEYS)
        self.image_size = int(config["image_size"])
        self.mask_size = int(config["mask_size"])
        self.mask_threshold = float(config["mask_threshold"])
        self.pixel_mean = np.asarray(config["pixel_mean"], dtype=np.float32)
        self.pixel_std = np.asarray(config["pixel_std"], dtype=np.float32)
        self.cuda_graphs: dict[str, str] = {}
        self.encoder, graphs = open_session(make_session, manifest.model_path(SAM_ENCODER), cuda_graphs=cuda_graphs)
        if graphs is not None:
            self.cuda_graphs[SAM_ENCODER] = graphs
        self._encoder_runner = runner_for(self.encoder, io_binding, static=self.cuda_graphs.get(SAM_ENCODER) == "captured")
        self._make_session, self._manifest, self._io_binding = make_session, manifest, io_binding
        self.decoder_boxes: int | None = None  # the most boxes per decoder call once fixed (fix_box_count)
        self.decoder_box_counts: tuple[int, ...] = ()  # the fixed counts a chunk may take (fixed_box_counts)
        # The decoder opens on first need (decoder_session): a GPU pipeline fixes its box count
        # first, so it is optimised once, not twice.
        self.decoder: Any = None
        self._decoder_runner: Any = None
        self._fixed_decoders: dict[int, tuple[Any, Any]] = {}  # box count -> (session, runner), opened on need
        # With IO binding (GPU) the decoder's logits stay on the device and one graph upscales all
        # of a chunk's masks there; the CPU path upscales each mask with cv2 (faster on a CPU).
        # The decoder runs where the encoder does: same factory, same binding.
        self._mask_runner = None
        engine_settings = getattr(make_session, "settings", None)  # a SessionFactory's: the built-in graphs' switches
        if isinstance(self._encoder_runner, DeviceRunner):
            self._mask_runner = DeviceRunner(mask_session(self._encoder_runner.device, engine_settings))
        self._canvas = None
        if device_canvas and isinstance(self._encoder_runner, DeviceRunner):
            self._canvas = DeviceCanvas(self._encoder_runner.device, (self.image_size, self.image_size),
                                        self.pixel_mean, self.pixel_std, settings=engine_settings)
        self._embedding: Any = None  # numpy, or an OrtValue on the device
        self._original_size: tuple[int, int] = (0, 0)
        self._input_size: tuple[int, int] = (0, 0)

    # --- image side -------------------------------------------------------
    def _checked_input_size(self, image: np.ndarray) -> tuple[int, int]:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ImageError(f"SAM needs a uint8 HxWx3 image, got {got}")
        height, width = image.shape[:2]
        if height == 0 or width == 0:
            raise ImageError(f"SAM got an empty image of shape {image.shape}")
        new_h, new_w = longest_side_shape(height, width, self.image_size)
        if new_h == 0 or new_w == 0:
            raise ImageError(f"image of {height}x{width} is too thin for SAM: it resizes to {new_h}x{new_w}")
        return new_h, new_w

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """uint8 HxWx3 -> ([1, 3, S, S] float32 normalised and padded, resized (h, w))."""
        input_size = self._checked_input_size(image)
        resized = resize_like_pil(image, input_size)
        # Normalise, then pad with zeros (Sam.preprocess pads after normalising).
        canvas = normalised_canvas(resized, (self.image_size, self.image_size), self.pixel_mean, self.pixel_std)
        return canvas, input_size

    def set_image(self, image: np.ndarray) -> None:
        """Run the image encoder once; later predict_boxes() calls reuse the embedding. The input
        is made on the device where the device canvas is on (runtime.engine.device_canvas)."""
        self._embedding = None
        if self._canvas is None:
            tensor, input_size = self.preprocess(image)
        else:
            input_size = self._checked_input_size(image)
            tensor = self._canvas(image, input_size)
        try:
            (embedding,) = self._encoder_runner.run([ENCODER_OUTPUT], {ENCODER_INPUT: tensor}, keep=(ENCODER_OUTPUT,))
        except Exception as err:
            raise engine_failure(f"{SAM_ENCODER} failed", err) from None
        self._embedding = embedding
        self._original_size = (int(image.shape[0]), int(image.shape[1]))
        self._input_size = input_size

    # --- prompt side ------------------------------------------------------
    def transform_boxes(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """ResizeLongestSide.apply_boxes: original pixels -> the resized (pre-padding) frame, float32."""
        (old_h, old_w), (new_h, new_w) = self._original_size, self._input_size
        # float32 times the scale as float32, as apply_boxes_torch does on the reference's float tensors.
        scale = np.array([new_w / old_w, new_h / old_h] * 2, dtype=np.float32)
        return boxes_xyxy.astype(np.float32) * scale

    def decode(self, boxes_input_frame: np.ndarray, keep_on_device: bool = False) -> tuple[Any, np.ndarray]:
        """One decoder call: [n, 4] boxes in the 1024 frame -> ([n, 1, m, m] logits, [n, 1] iou).

        keep_on_device: the logits come back as an OrtValue left where the decoder ran (IO binding)."""
        if self._embedding is None:
            raise EngineError("Segmenter: call set_image() before predicting masks")
        feeds = {DECODER_INPUTS[0]: self._embedding, DECODER_INPUTS[1]: np.ascontiguousarray(boxes_input_frame, dtype=np.float32)}
        keep = DECODER_OUTPUTS[:1] if keep_on_device else ()
        runner = self._decoder_runner_for(len(boxes_input_frame))
        try:
            low_res, iou = runner.run(DECODER_OUTPUTS, feeds, keep=keep)
        except Exception as err:
            raise engine_failure(f"{SAM_DECODER} failed on {len(boxes_input_frame)} boxes", err) from None
        expected = (len(boxes_input_frame), 1, self.mask_size, self.mask_size)
        shape = tuple(low_res.shape()) if isinstance(low_res, ort.OrtValue) else low_res.shape
        if shape != expected:
            raise EngineError(f"{SAM_DECODER} returned masks of shape {shape}, expected {expected}")
        return low_res, iou

    def decoder_session(self) -> Any:
        """The decoder's session: the one fix_box_count opened, else the dynamic one (opened now)."""
        if self.decoder is None:
            self.decoder = self._make_session(self._manifest.model_path(SAM_DECODER))
            self._decoder_runner = runner_for(self.decoder, self._io_binding)
        return self.decoder

    def fix_box_count(self, boxes: int) -> bool:
        """Reopen the decoder with its box count fixed (GPU paths, where the masks are made on the
        device), for at most `boxes` boxes per call. Every shape is then known when onnxruntime
        optimises, so its shape arithmetic folds away, and with the encoder capturing CUDA graphs
        the decoder captures one too. A chunk takes the smallest of fixed_box_counts(boxes) that
        fits it, padded with copies of its last box (the copies' masks are made and never used:
        DeviceMasks.counts): 30 boxes with boxes=64 are decoded as 32, 5 as 8. The decoder for
        `boxes` opens now, the smaller ones on their first chunk. False where it does not apply
        (no device masks, or a session factory that cannot fix dims)."""
        if isinstance(boxes, bool) or not isinstance(boxes, (int, np.integer)) or boxes < 1:
            raise EngineError(f"Segmenter: boxes per decoder call must be a positive integer, got {boxes!r}")
        if self._mask_runner is None or not getattr(self._make_session, "fixes_dims", False):
            return False
        self._fixed_decoders = {}
        for key in [key for key in self.cuda_graphs if key.startswith(SAM_DECODER)]:
            del self.cuda_graphs[key]  # a count fixed again: what the new sessions capture
        self.decoder, self._decoder_runner = self._open_fixed_decoder(int(boxes))
        self.decoder_boxes = int(boxes)
        self.decoder_box_counts = fixed_box_counts(int(boxes))
        return True

    def _open_fixed_decoder(self, boxes: int) -> tuple[Any, Any]:
        """The decoder session for exactly `boxes` boxes a call, and its runner (kept for later chunks)."""
        # CUDA graphs only behind a capturing encoder: the decoder's input is its fixed buffer.
        session, graphs = open_session(self._make_session, self._manifest.model_path(SAM_DECODER),
                                       {"num_boxes": boxes}, cuda_graphs=self.cuda_graphs.get(SAM_ENCODER) == "captured")
        if graphs is not None:  # the first (largest) under the graph's name, a smaller one only where it differs
            if SAM_DECODER not in self.cuda_graphs:
                self.cuda_graphs[SAM_DECODER] = graphs
            elif graphs != self.cuda_graphs[SAM_DECODER]:
                self.cuda_graphs[f"{SAM_DECODER}@{boxes}"] = graphs
        runner = runner_for(session, self._io_binding, static=graphs == "captured")
        self._fixed_decoders[boxes] = (session, runner)
        return session, runner

    def _decoder_runner_for(self, boxes: int) -> Any:
        """The runner of the decoder for a call of `boxes` boxes: with fixed counts, the one fixed to
        that count (opened now if it is one of decoder_box_counts), else the one decoder."""
        if boxes in self.decoder_box_counts:
            opened = self._fixed_decoders.get(boxes)
            return opened[1] if opened is not None else self._open_fixed_decoder(boxes)[1]
        self.decoder_session()
        return self._decoder_runner

    def _fixed_count_for(self, boxes: int) -> int:
        """The smallest fixed box count that takes a chunk of `boxes` (decoder_boxes at most)."""
        return next(count for count in self.decoder_box_counts if count >= boxes)

    @property
    def opened_box_counts(self) -> list[int]:
        """The fixed box counts whose decoders are open so far (smaller ones open on first need)."""
        return sorted(self._fixed_decoders)

    @property
    def mask_device(self) -> str:
        """Where the masks are made: the decoder's device with IO binding, else "cpu" (cv2)."""
        return self._mask_runner.device if self._mask_runner is not None else "cpu"

    @property
    def masks_on_device(self) -> bool:
        """Whether predict_boxes(on_device=True) can leave the masks on the device (IO binding)."""
        return self._mask_runner is not None

    def predict_boxes(self, boxes_xyxy: np.ndarray, chunk: int = 32, on_device: bool = False) -> np.ndarray | DeviceMasks:
        """[N, 4] xyxy boxes in original pixels -> bool masks [N, H, W] (multimask_output=False).

        The decoder runs on at most `chunk` boxes at a time and each mask is upscaled
        on its own, so memory beyond the returned masks stays bounded. on_device (needs
        masks_on_device): the chunks' masks stay on the device as DeviceMasks
        (runtime.stages.mask_fusion scores and fuses them there).
        """
        if self._embedding is None:
            raise EngineError("Segmenter: call set_image() before predict_boxes()")
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise EngineError(f"Segmenter: chunk must be a positive integer, got {chunk!r}")
        if on_device and not self.masks_on_device:
            raise EngineError("Segmenter: masks stay on the device only with IO binding (an onnxruntime session on a GPU)")
        boxes = np.asarray(boxes_xyxy)
        height, width = self._original_size
        if boxes.size == 0 and boxes.ndim in (1, 2):
            if on_device:
                return DeviceMasks([], height, width, self._mask_runner.device)
            return np.zeros((0, height, width), dtype=bool)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.issubdtype(boxes.dtype, np.number):
            raise EngineError(f"Segmenter: boxes must be a numeric [N, 4] xyxy array, got {boxes.dtype} {boxes.shape}")
        if not np.all(np.isfinite(boxes)):
            raise EngineError("Segmenter: boxes contain NaN or infinity")
        scaled = self.transform_boxes(boxes)
        # Fixed box counts: chunks of the largest, the last one padded to the smallest count that takes it.
        chunk = self.decoder_boxes or int(chunk)
        starts = range(0, len(boxes), chunk)
        if self._mask_runner is not None:
            counts = [min(chunk, len(boxes) - start) for start in starts]
            chunks = [self._upscale_on_device(self._pad_to_fixed_count(scaled[start : start + chunk]), keep_on_device=on_device)
                      for start in starts]
            if on_device:
                return DeviceMasks(chunks, height, width, self._mask_runner.device, counts)
            return np.concatenate([masks[:count] for masks, count in zip(chunks, counts)])
        masks = np.empty((len(boxes), height, width), dtype=bool)
        for start in starts:
            low_res, _ = self.decode(scaled[start : start + int(chunk)])
            for offset, logits in enumerate(low_res[:, 0]):
                upscaled = upscale_mask_logits(logits, self._input_size, self._original_size, self.image_size)
                masks[start + offset] = upscaled > self.mask_threshold
        return masks

    def region_masks(self, regions: list[Region], image_hw: tuple[int, int], chunk: int = 32,
                     on_device: bool = False) -> tuple[np.ndarray | DeviceMasks, np.ndarray]:
        """(SAM's masks of the regions' distinct boxes, each region's index into them): regions of
        one box share a decode (joined captions keep a query for every caption it passes). Masks
        for the host are refused with the sizes named where they would not fit in its memory.
        image_hw: the image's size (with no region, SAM may not have seen the image)."""
        if not regions:
            return np.zeros((0, *image_hw), dtype=bool), np.zeros(0, np.int64)
        boxes, mask_of_region = distinct_boxes(regions)
        if not on_device:
            check_mask_memory(len(boxes), image_hw)
        return self.predict_boxes(boxes, chunk=chunk, on_device=on_device), mask_of_region

    def _pad_to_fixed_count(self, boxes_input_frame: np.ndarray) -> np.ndarray:
        """A chunk padded with copies of its last box to the smallest fixed count that takes it."""
        if not self.decoder_box_counts:
            return boxes_input_frame
        missing = self._fixed_count_for(len(boxes_input_frame)) - len(boxes_input_frame)
        if missing <= 0:
            return boxes_input_frame
        return np.concatenate([boxes_input_frame, np.repeat(boxes_input_frame[-1:], missing, axis=0)])

    def _upscale_on_device(self, boxes_input_frame: np.ndarray, keep_on_device: bool) -> Any:
        """One chunk through the decoder and the mask graph; the logits never leave the device."""
        low_res, _ = self.decode(boxes_input_frame, keep_on_device=True)
        return upscale_masks_graph(low_res, self._input_size, self._original_size, self.image_size,
                                   self.mask_threshold, self._mask_runner, keep_on_device=keep_on_device)
