"""GroundingDINO on onnxruntime: encode the image once, encode a config's captions once, detect.

    detector = Detector(manifest, make_session)
    text = detector.encode_text(["bottle,", "defect on bottle", "crack. hole."])  # cache per config
    image = detector.encode_image(rgb)                                             # once per image
    for det in detector.detect(image, text):                                      # one per caption
        det.logits  # [900, L_i] sigmoid token scores over the caption's real tokens
        det.boxes   # [900, 4] cx, cy, w, h normalised to the real image
        det.phrase_of(det.logits[q] > text_threshold)  # the reference's phrase of query q

The three graphs and why they are split are described in export/gdino.py. Preprocessing
follows the reference: shorter side to short_side (800) with the longer at most max_side
(1333), PIL-compatible bilinear resize, ImageNet mean/std on RGB in 0..1. The result is placed
top-left in the engine's fixed H x W canvas with a pixel mask marking it; GroundingDINO
(through its valid ratios) predicts boxes relative to the masked region, i.e. normalised to
the real image, as the reference's boxes are. When the resized image is smaller than the
engine, the zero padding is what the authors' batched inference feeds too, but Swin's windows
see it, so results are close to, not equal to, the unpadded reference; when it would not fit,
it is scaled down further to fit and then differs from the reference more (ImageFeatures.exact
is False). Export engines whose H x W equals the resized size of your images for exact parity.

Even then a few queries can differ from PyTorch: GroundingDINO keeps the 900 best-scoring image
positions as queries, and two scores closer than float rounding (common among 900) may be
ranked the other way, which changes those queries' outputs. Detections.query_index records the
selection so such differences can be told apart from real ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..engine.device_canvas import DeviceCanvas
from ..errors import EngineError, ImageError, ManifestError, engine_failure
from ..manifest import GDINO_HEAD, GDINO_IMAGE, GDINO_TEXT, Manifest
from ..engine.pixels import normalised_canvas
from ..engine.resize import resize_like_pil, shorter_side_shape
from ..engine.runners import DeviceRunner, named_dims, open_session, runner_for
from .text import TOKENIZER_KEY, EncodedText, GdinoTokenizer, JoinedCaptions, encode_captions, join_captions

PREPROCESS_KEY = "gdino"
PREPROCESS_FIELDS = ("height", "width", "short_side", "max_side", "mean", "std", "max_text_len", "num_queries")
IMAGE_OUTPUTS = ("vision_features", "vision_mask", "vision_pos", "valid_ratios")
HEAD_OUTPUTS = ("logits", "boxes", "query_index")
# Prompt x image positions per head run on the CPU: the fusion encoder's activations grow with
# both and a CPU gains nothing from batching captions (tiny 224x224 engines: 1045 positions,
# all captions at once; Swin-T at 800x800: 13294 positions, one caption per run).
CPU_HEAD_POSITIONS = 16384


@dataclass(frozen=True)
class TextFeatures:
    """A config's captions through the text graph; reusable with any image."""

    encoded: EncodedText  # what the text graph and the head get: the captions, or the joined captions
    features: np.ndarray  # [P, L, d_model] float32
    joined: JoinedCaptions | None = None  # set where the captions were joined (runtime.stages.text.join_captions)

    @property
    def captions(self) -> tuple[str, ...]:
        return self.joined.captions if self.joined is not None else self.encoded.captions


@dataclass(frozen=True)
class ImageFeatures:
    """One image through the image graph."""

    tensors: dict[str, Any]  # the image graph's outputs by name, batch 1 (OrtValues on the GPU with IO binding)
    image_hw: tuple[int, int]  # the input image
    content_hw: tuple[int, int]  # the resized image inside the engine canvas (top-left)
    exact: bool  # content_hw is the reference's resized size (no extra scale-down to fit)
    reference_hw: tuple[int, int] = (0, 0)  # the reference's resized size: an engine of this size runs it exactly
    engine_hw: tuple[int, int] = (0, 0)  # the engine canvas

    @property
    def as_reference(self) -> bool:
        """GroundingDINO saw the image as the reference does: resized the same and not padded."""
        return self.content_hw == self.reference_hw == self.engine_hw

    def difference(self) -> str | None:
        """What differs from the reference's input, and the engine size that would make it equal; None when equal."""
        if self.as_reference:
            return None
        (h, w), (rh, rw), (eh, ew) = self.image_hw, self.reference_hw, self.engine_hw
        how = (f"padded to the {eh}x{ew} engine" if self.exact else
               f"scaled down further to {self.content_hw[0]}x{self.content_hw[1]} and padded to fit the {eh}x{ew} engine")
        return (f"not exact: the reference gives GroundingDINO this {h}x{w} image resized to {rh}x{rw}, unpadded; "
                f"here it was {how}, so boxes and the map can differ from the reference's. Engines exported with "
                f"--detector-size {rh}x{rw} run images of this size exactly")


@dataclass(frozen=True)
class Detections:
    """GroundingDINO's raw answer for one caption (all queries; thresholds are applied later)."""

    caption: str  # normalised as the reference tokenizes it
    logits: np.ndarray  # [Q, L_i] float32 sigmoid scores, L_i = the caption's tokens incl. [CLS]/[SEP]
    boxes: np.ndarray  # [Q, 4] float32 cx, cy, w, h in 0..1 of the real image
    token_ids: np.ndarray  # [L_i] int64
    query_index: np.ndarray  # [Q] int64: the image positions the top-Q selection picked, in rank order
    tokenizer: GdinoTokenizer = field(repr=False, compare=False)

    def phrase_of(self, token_mask: np.ndarray) -> str:
        """Phrase of one query from its token mask (e.g. logits[q] > text_threshold), as the reference decodes it."""
        return self.tokenizer.phrase_from_mask(self.token_ids, token_mask)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow warnings (-inf -> 0)."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def gdino_preprocess(manifest: Manifest) -> dict[str, Any]:
    """manifest preprocess["gdino"], checked for the fields the detector reads."""
    return manifest.preprocess_section(PREPROCESS_KEY, PREPROCESS_FIELDS)


class Detector:
    """GroundingDINO's three graphs behind encode_text / encode_image / detect."""

    def __init__(
        self,
        manifest: Manifest,
        make_session: Callable[[Path], Any],
        max_prompts_per_run: int | None = None,
        io_binding: bool | None = None,
        cuda_graphs: bool = False,
        device_canvas: bool = False,
    ):
        """make_session(path) -> onnxruntime.InferenceSession (the caller picks providers/threads).

        max_prompts_per_run bounds how many captions share one head run (memory grows with
        prompts x image positions). None: all captions together on a GPU; on the CPU as many
        as keep prompts x positions within CPU_HEAD_POSITIONS (at 800x800, one caption per run:
        measured with Swin-T, batching five cost 10 GB more and was no faster than one by one).
        io_binding: see runtime.engine.runners.runner_for (None: on a GPU the image graph's outputs
        stay there and feed the head without a round trip through the host).
        cuda_graphs (with IO binding, a session factory of runtime.engine.sessions): the image graph,
        and the head once its shapes are fixed, capture CUDA graphs where onnxruntime allows it;
        `cuda_graphs` then says per graph "captured" or why not.
        device_canvas (with IO binding): the image's resize and normalisation run on the device
        (runtime.engine.device_canvas; the same canvas to the bit).
        """
        config = gdino_preprocess(manifest)
        self.height, self.width = int(config["height"]), int(config["width"])
        self.short_side, self.max_side = int(config["short_side"]), int(config["max_side"])
        self.mean = np.asarray(config["mean"], dtype=np.float32)
        self.std = np.asarray(config["std"], dtype=np.float32)
        self.num_queries = int(config["num_queries"])
        self.tokenizer = GdinoTokenizer(manifest.file_path(TOKENIZER_KEY), max_text_len=int(config["max_text_len"]))
        if max_prompts_per_run is not None and max_prompts_per_run < 1:
            raise ValueError(f"max_prompts_per_run must be >= 1, got {max_prompts_per_run}")
        self.max_prompts_per_run = max_prompts_per_run
        self.cuda_graphs: dict[str, str] = {}
        self._make_session, self._manifest, self._io_binding = make_session, manifest, io_binding
        self._text = self._open(GDINO_TEXT)
        self._image = self._open(GDINO_IMAGE, cuda_graphs=cuda_graphs)
        self._runners = {id(self._text): runner_for(self._text, io_binding),
                         id(self._image): runner_for(self._image, io_binding, static=self._captures(GDINO_IMAGE))}
        image_runner = self._runners[id(self._image)]
        # a SessionFactory's settings: the built-in graph's session switches
        self._canvas = (DeviceCanvas(image_runner.device, (self.height, self.width), self.mean, self.std, 255.0,
                                     getattr(make_session, "settings", None))
                        if device_canvas and isinstance(image_runner, DeviceRunner) else None)
        # The head opens on first need (head_session): a GPU pipeline fixes its shapes first, so
        # the largest graph is optimised once, not twice (ViT-B on the CPU provider: 3.1 -> 2.5 s to build,
        # bench/results/fp16_folding_cpu_2026-11-26.json).
        self._head: Any = None
        self.head_dims: dict[str, int] = {}  # the head's named dimensions once fixed (fix_head_shapes)
        engine_hw = tuple(self._image.get_inputs()[0].shape[2:])
        if engine_hw != (self.height, self.width):
            raise ManifestError(
                f"{manifest.model_path(GDINO_IMAGE)} takes {engine_hw[0]}x{engine_hw[1]} images but the manifest says "
                f"{self.height}x{self.width}: the engines dir is inconsistent (re-export it)"
            )

    def _captures(self, name: str) -> bool:
        return self.cuda_graphs.get(name) == "captured"

    def _open(self, key: str, fixed_dims: Mapping[str, int] | None = None, cuda_graphs: bool = False) -> Any:
        """One graph's session (runtime.engine.runners.open_session); its CUDA-graph status, where one was
        asked for, goes into self.cuda_graphs."""
        path = self._manifest.model_path(key)
        try:
            session, graphs = open_session(self._make_session, path, fixed_dims, cuda_graphs)
        except Exception as err:  # onnxruntime raises its own exception types
            raise engine_failure(f"cannot load {path}", err) from None
        if graphs is not None:
            self.cuda_graphs[key] = graphs
        return session

    def head_session(self) -> Any:
        """The head's session: the one fix_head_shapes opened, else the dynamic one (opened now)."""
        if self._head is None:
            self._use_head(self._open(GDINO_HEAD))
        return self._head

    def _use_head(self, head: Any) -> None:
        if self._head is not None:
            self._runners.pop(id(self._head))
        self._head = head
        self._runners[id(head)] = runner_for(head, self._io_binding, static=self._captures(GDINO_HEAD))

    def _run(self, session: Any, name: str, feeds: dict[str, Any], outputs: Sequence[str], keep: Sequence[str] = ()) -> list[Any]:
        try:
            return self._runners[id(session)].run(outputs, feeds, keep)
        except Exception as err:
            raise engine_failure(f"{name} failed", err) from None

    # -- text ---------------------------------------------------------------------------------

    def encode_text(self, captions: Sequence[str], joined: bool = False) -> TextFeatures:
        """Captions (normalised as the reference does) through the text graph, all at once.

        joined: as GroundingDINO's multi-phrase captions (runtime.stages.text.join_captions), so that the
        head runs once for all of them instead of once per caption; detect still answers per caption.
        """
        joined_captions = join_captions(self.tokenizer, captions) if joined else None
        encoded = joined_captions.encoded if joined_captions is not None else encode_captions(self.tokenizer, captions)
        (features,) = self._run(self._text, GDINO_TEXT, {
            "input_ids": encoded.input_ids,
            "position_ids": encoded.position_ids,
            "text_self_attention_masks": encoded.text_self_attention_masks,
        }, [self._text.get_outputs()[0].name])
        return TextFeatures(encoded=encoded, features=features, joined=joined_captions)

    # -- image --------------------------------------------------------------------------------

    def content_shape(self, height: int, width: int) -> tuple[tuple[int, int], bool]:
        """(resized size inside the canvas, whether it is the reference's size)."""
        resized = shorter_side_shape(height, width, self.short_side, self.max_side)
        if resized[0] <= self.height and resized[1] <= self.width:
            return resized, True
        scale = min(self.height / height, self.width / width)
        fitted = (max(1, min(self.height, int(height * scale + 0.5))), max(1, min(self.width, int(width * scale + 0.5))))
        return fitted, False

    def _checked_content_shape(self, image_rgb: np.ndarray) -> tuple[tuple[int, int], bool]:
        if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
            described = f"{image_rgb.dtype} array of shape {image_rgb.shape}" if isinstance(image_rgb, np.ndarray) else type(image_rgb).__name__
            raise ImageError(f"GroundingDINO needs a uint8 HxWx3 RGB image, got a {described}")
        height, width = image_rgb.shape[:2]
        if height < 1 or width < 1:
            raise ImageError(f"image of size {height}x{width} is empty")
        (content_h, content_w), exact = self.content_shape(height, width)
        if content_h < 1 or content_w < 1:  # a line-scan strip: the reference's resize makes it empty too
            raise ImageError(f"image of {height}x{width} is too thin for GroundingDINO: it resizes to {content_h}x{content_w}")
        return (content_h, content_w), exact

    def _pixel_mask(self, content_hw: tuple[int, int]) -> np.ndarray:
        mask = np.zeros((1, self.height, self.width), dtype=np.int64)
        mask[0, :content_hw[0], :content_hw[1]] = 1
        return mask

    def preprocess(self, image_rgb: np.ndarray) -> tuple[dict[str, np.ndarray], tuple[int, int], bool]:
        """(image graph feeds, content size, exact) for a uint8 HxWx3 RGB image."""
        content_hw, exact = self._checked_content_shape(image_rgb)
        resized = resize_like_pil(image_rgb, content_hw)
        # ToTensor then Normalize, in float32 as torchvision does
        pixels = normalised_canvas(resized, (self.height, self.width), self.mean, self.std, divisor=255.0)
        return {"pixel_values": pixels, "pixel_mask": self._pixel_mask(content_hw)}, content_hw, exact

    def encode_image(self, image_rgb: np.ndarray) -> ImageFeatures:
        """One image through the image graph (resize, normalise, place in the engine canvas; on the
        device where the device canvas is on, runtime.engine.device_canvas)."""
        if self._canvas is None:
            feeds, content_hw, exact = self.preprocess(image_rgb)
        else:
            content_hw, exact = self._checked_content_shape(image_rgb)
            feeds = {"pixel_values": self._canvas(image_rgb, content_hw), "pixel_mask": self._pixel_mask(content_hw)}
        names = [o.name for o in self._image.get_outputs()]
        outputs = self._run(self._image, GDINO_IMAGE, feeds, names, keep=IMAGE_OUTPUTS)
        height, width = image_rgb.shape[:2]
        return ImageFeatures(
            tensors=dict(zip(names, outputs)), image_hw=(int(height), int(width)), content_hw=content_hw, exact=exact,
            reference_hw=shorter_side_shape(height, width, self.short_side, self.max_side),
            engine_hw=(self.height, self.width))

    # -- detection ----------------------------------------------------------------------------

    def _auto_prompts_per_run(self, image: ImageFeatures, count: int) -> int:
        if self._runners[id(self.head_session())].device != "cpu":
            return count
        features = image.tensors[IMAGE_OUTPUTS[0]]
        positions = int((features.shape() if callable(features.shape) else features.shape)[1])  # OrtValue or numpy
        return max(1, min(count, CPU_HEAD_POSITIONS // max(1, positions)))

    @staticmethod
    def _text_feeds(text: TextFeatures, rows: slice) -> dict[str, np.ndarray]:
        """The head's text inputs for captions `rows`, cut to the chunk's own longest caption."""
        encoded = text.encoded
        length = int(encoded.lengths[rows].max())
        return {
            "text_features": text.features[rows, :length],
            "text_token_mask": encoded.attention_mask[rows, :length],
            "text_position_ids": encoded.position_ids[rows, :length],
            "text_self_attention_masks": encoded.text_self_attention_masks[rows, :length, :length],
        }

    def fix_head_shapes(self, text: TextFeatures) -> dict[str, int]:
        """Reopen the head with its named dimensions (captions, tokens) fixed to `text`'s, for
        pipelines that run all of a config's captions in one head run (GPU). Shapes known
        up front let onnxruntime fold the head's shape arithmetic (no Shape node left, 20% fewer
        nodes, and none of them on the CPU between GPU kernels). Detections are unchanged (tested);
        a run with other captions is then refused by onnxruntime. Returns the dims fixed ({} when
        the session factory cannot fix dims)."""
        if not getattr(self._make_session, "fixes_dims", False):
            return {}
        count = len(text.encoded.captions)
        if self.max_prompts_per_run is not None and self.max_prompts_per_run < count:
            raise EngineError(f"the head runs {self.max_prompts_per_run} of {count} captions at a time: "
                              "its shapes cannot be fixed to all of them")
        # The dimension names from the manifest (the exporter wrote them from the graph): no session needed.
        inputs = self._manifest.inputs(GDINO_HEAD) if self._head is None else None
        inputs = inputs or self.head_session().get_inputs()
        dims = named_dims(inputs, self._text_feeds(text, slice(0, count)))
        # CUDA graphs only behind a capturing image graph: the head's inputs are its fixed buffers.
        self._use_head(self._open(GDINO_HEAD, dims, cuda_graphs=self._captures(GDINO_IMAGE)))
        self.max_prompts_per_run = count
        self.head_dims = dims
        return dims

    def detect(self, image: ImageFeatures, text: TextFeatures) -> list[Detections]:
        """Every caption of `text` against `image`: one Detections per caption, in order (joined
        captions: each caption's own token columns of its joined caption's answer)."""
        encoded = text.encoded
        count = len(encoded.captions)
        step = self.max_prompts_per_run or self._auto_prompts_per_run(image, count)
        rows_out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (logits, boxes, query_index) per head row
        for start in range(0, count, step):
            rows = slice(start, min(count, start + step))
            feeds = {name: image.tensors[name] for name in IMAGE_OUTPUTS}
            feeds.update(self._text_feeds(text, rows))
            logits, boxes, selected = self._run(self.head_session(), GDINO_HEAD, feeds, HEAD_OUTPUTS)
            rows_out += [(logits[offset], boxes[offset], selected[offset]) for offset in range(rows.stop - rows.start)]
        if text.joined is None:
            return [self._detections(encoded.captions[i], *rows_out[i], slice(0, int(encoded.lengths[i])),
                                     encoded.token_ids(i)) for i in range(count)]
        joined = text.joined
        return [self._detections(caption, *rows_out[span.row], joined.columns(i), span.token_ids)
                for i, (caption, span) in enumerate(zip(joined.captions, joined.spans))]

    def _detections(self, caption: str, logits: np.ndarray, boxes: np.ndarray, selected: np.ndarray,
                    columns: slice | np.ndarray, token_ids: np.ndarray) -> Detections:
        return Detections(
            caption=caption,
            logits=sigmoid(logits[:, columns]),
            boxes=boxes.astype(np.float32, copy=False),
            token_ids=token_ids.copy(),
            query_index=selected,
            tokenizer=self.tokenizer,
        )

