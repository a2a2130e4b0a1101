"""Saliency CNN export: the ModelINet wrapper, checkpoint layouts, ONNX parity, the manifest record."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from export import saliency as S
from export.common import ExportError, ort_session

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_wrn")
    models, preprocess = S.export_tiny_wrn(out)
    return out, models, preprocess


def full_tiny_state() -> dict[str, torch.Tensor]:
    """A checkpoint of the whole tiny network (layer4 and fc included), as a classifier would save it."""
    torch.manual_seed(1)
    model = timm.create_model("wide_resnet50_2", pretrained=False, **S.TINY_WRN)
    state = model.state_dict()
    for name, tensor in state.items():  # every tensor differs from a fresh random init, BN statistics too
        if name.endswith("running_var"):
            state[name] = torch.rand_like(tensor) + 0.5
        elif tensor.dtype.is_floating_point:
            state[name] = torch.randn_like(tensor) * 0.1
    return state


def test_wrapper_is_modelinet():
    """Nearest upsampling of strides 8 and 16 to the stride-4 grid, concat, unit length: ModelINet's forward."""
    cnn = S.build_saliency_cnn("wide_resnet50_2", random_init=True, tiny=True)
    image = S.parity_image(128)
    with torch.no_grad():
        got = cnn(image)
        layers = cnn.backbone(image)
    assert [f.shape[1] for f in layers] == [32, 64, 128]
    assert got.shape == (1, 224, 32, 32) and cnn.channels == 224
    expected = F.normalize(torch.cat([layers[0]] + [F.interpolate(f, size=(32, 32), mode="nearest") for f in layers[1:]], 1), dim=1)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(1, 32, 32))


def test_real_backbones_have_the_papers_channels():
    wrn = S.create_backbone("wide_resnet50_2")
    lite = S.create_backbone("efficientnet_lite0")
    assert wrn.feature_info.channels() == [256, 512, 1024] and wrn.feature_info.reduction() == [4, 8, 16]
    assert lite.feature_info.channels() == [24, 40, 112] and lite.feature_info.reduction() == [4, 8, 16]


def test_tiny_export_parity_and_io(tiny_export):
    out, models, preprocess = tiny_export
    (model,) = models
    assert model.name == "saliency" and model.file == "saliency.onnx" and (out / model.file).is_file()
    assert model.inputs == [{"name": "image", "shape": [1, 3, "height", "width"], "dtype": "float32"}]
    assert model.outputs == [{"name": "features", "shape": [1, 224, "grid_height", "grid_width"], "dtype": "float32"}]
    assert model.parity["passed"] and model.parity["max_abs_diff"] <= S.PARITY_ATOL
    assert [c["case"].split(" ")[0] for c in model.parity["cases"]] == ["256x256", "320x320"]
    assert model.source["checkpoint"]["kind"] == "random_init" and model.source["tiny"]


def test_onnx_runs_at_the_multi_object_size(tiny_export):
    """The graph traced at 256 must serve 1024 (several objects) and non-square inputs."""
    out, _, _ = tiny_export
    cnn = S.build_saliency_cnn("wide_resnet50_2", random_init=True, tiny=True)  # same seed, same weights
    session = ort_session(out / "saliency.onnx")
    for height, width in ((1024, 1024), (192, 128)):
        image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(height))
        (got,) = session.run(["features"], {"image": image.numpy()})
        with torch.no_grad():
            expected = cnn(image).numpy()
        assert got.shape == (1, 224, height // 4, width // 4)
        assert np.abs(got - expected).max() < S.PARITY_ATOL


def test_preprocess_record_is_the_reference_normalisation(tiny_export):
    _, _, record = tiny_export
    assert record["backbone"] == "wide_resnet50_2" and record["channels"] == 224
    assert (record["single_size"], record["multi_size"], record["stride"]) == (256, 1024, 4)
    np.testing.assert_allclose(record["mean"], [0.485 * 255, 0.456 * 255, 0.406 * 255])
    np.testing.assert_allclose(record["std"], [0.229 * 255, 0.224 * 255, 0.225 * 255])
    cnn = S.build_saliency_cnn("wide_resnet50_2", random_init=True, tiny=True)
    assert S.preprocess_record("wide_resnet50_2", cnn) == record  # export/engine_dir.py passes the module
    with pytest.raises(ExportError, match="unknown saliency backbone"):
        S.preprocess_record("resnet18", 10)


# ---------------------------------------------------------------- checkpoints


def _features_of(cnn) -> torch.Tensor:
    with torch.no_grad():
        return cnn(S.parity_image(64))


@pytest.mark.parametrize("layout", ["torchvision", "timm_wrapped", "timm_safetensors"])
def test_wrn_checkpoint_layouts_load_the_same_weights(tmp_path, layout):
    """torchvision and timm name WideResNet tensors alike; only the container differs."""
    state = full_tiny_state()
    if layout == "torchvision":
        # torchvision's file: a plain dict, fc and layer4 included, no num_batches_tracked
        payload = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        path = tmp_path / "wide_resnet50_2-95faca4d.pth"
        torch.save(payload, path)
    elif layout == "timm_wrapped":
        path = tmp_path / "checkpoint.pth.tar"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    cnn = S.build_saliency_cnn("wide_resnet50_2", checkpoint=path, tiny=True)
    own = cnn.backbone.state_dict()
    for key, tensor in own.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(tensor, state[key]), key
    assert cnn.source["checkpoint"]["kind"] == "checkpoint" and cnn.source["checkpoint"]["sha256"]
    random = S.build_saliency_cnn("wide_resnet50_2", random_init=True, tiny=True)
    assert not torch.allclose(_features_of(cnn), _features_of(random))


def test_wrn_checkpoint_errors_name_the_tensor(tmp_path):
    state = full_tiny_state()
    wrong_shape = dict(state)
    wrong_shape["layer2.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(wrong_shape, tmp_path / "shape.pth")
    with pytest.raises(ExportError, match=r"layer2\.0\.conv1\.weight has shape \(3, 3, 1, 1\)"):
        S.build_saliency_cnn("wide_resnet50_2", checkpoint=tmp_path / "shape.pth", tiny=True)
    missing = {k: v for k, v in state.items() if not k.startswith("layer3.")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ExportError, match=r"missing tensors \['layer3\."):
        S.build_saliency_cnn("wide_resnet50_2", checkpoint=tmp_path / "missing.pth", tiny=True)
    foreign = dict(state, **{"head.proj.weight": torch.zeros(2)})
    torch.save(foreign, tmp_path / "foreign.pth")
    with pytest.raises(ExportError, match=r"unexpected tensors \['head\.proj\.weight'\]"):
        S.build_saliency_cnn("wide_resnet50_2", checkpoint=tmp_path / "foreign.pth", tiny=True)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="cannot be read"):
        S.build_saliency_cnn("wide_resnet50_2", checkpoint=tmp_path / "junk.pth", tiny=True)
    with pytest.raises(ExportError, match="does not exist"):
        S.build_saliency_cnn("wide_resnet50_2", checkpoint=tmp_path / "absent.pth", tiny=True)


def test_lite0_package_weights_map_by_position_and_refuse_other_layouts():
    path = S.efficientnet_lite0_package_file()
    state = S.read_state_dict(path)
    assert len(state) == 296 and next(iter(state)) == "_conv_stem.weight"
    mapped = S.lite0_to_timm(state, "package")
    assert list(mapped)[:2] == ["conv_stem.weight", "bn1.weight"]
    assert torch.equal(mapped["blocks.0.0.conv_dw.weight"], state["_blocks.0._depthwise_conv.weight"])
    cnn = S.build_saliency_cnn("efficientnet_lite0")
    assert torch.equal(cnn.backbone.state_dict()["blocks.4.0.conv_pw.weight"], mapped["blocks.4.0.conv_pw.weight"])
    assert cnn.channels == 176 and cnn.source["checkpoint"]["kind"].startswith("package:")
    swapped = list(state.items())
    swapped[6], swapped[12] = swapped[12], swapped[6]  # a reordered file: shapes no longer line up
    with pytest.raises(ExportError, match="at the same position"):
        S.lite0_to_timm(dict(swapped), "reordered")
    with pytest.raises(ExportError, match="295 tensors"):
        S.lite0_to_timm(dict(list(state.items())[:-1]), "truncated")


def test_build_refuses_unknown_or_impossible_configs():
    with pytest.raises(ExportError, match="unknown saliency backbone"):
        S.build_saliency_cnn("resnet18", random_init=True)
    with pytest.raises(ExportError, match="tiny is defined for wide_resnet50_2 only"):
        S.build_saliency_cnn("efficientnet_lite0", tiny=True)
    cnn = S.build_saliency_cnn("wide_resnet50_2", random_init=True, tiny=True)
    with pytest.raises(ExportError, match="asked to export it as"):
        S.export_saliency(cnn, "/nonexistent", "efficientnet_lite0")


@pytest.mark.slow
def test_full_size_wrn_exports_with_parity(tmp_path):
    """The paper's WideResNet50-2 (random weights here: no download): 1792 channels, layer4 left out."""
    cnn = S.build_saliency_cnn("wide_resnet50_2", random_init=True)
    (model,) = S.export_saliency(cnn, tmp_path, "wide_resnet50_2")
    assert model.outputs[0]["shape"] == [1, 1792, "grid_height", "grid_width"]
    assert model.parity["max_abs_diff"] <= S.PARITY_ATOL
    assert not any(k.startswith("layer4.") for k in cnn.backbone.state_dict())
