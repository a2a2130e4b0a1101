"""The engines dir is checked before anything runs: each fault is named."""
import json

import pytest

from runtime import manifest as mf
from runtime.errors import ManifestError, SaaError


def write_dir(tmp_path, **overrides):
    (tmp_path / "saliency.onnx").write_bytes(b"graph")
    data = {"format_version": mf.FORMAT_VERSION, "profile": "lite", "preprocess": {},
            "models": {"saliency": {"file": "saliency.onnx", "sha256": mf.sha256_of(tmp_path / "saliency.onnx")}}}
    data.update(overrides)
    (tmp_path / mf.MANIFEST_NAME).write_text(json.dumps(data))
    return tmp_path


def test_valid_dir_loads(tmp_path):
    manifest = mf.load_manifest(write_dir(tmp_path))
    assert manifest.profile == "lite" and manifest.model_path("saliency").name == "saliency.onnx"


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / mf.MANIFEST_NAME).unlink(), "manifest.json is missing"),
    (lambda d: (d / mf.MANIFEST_NAME).write_text("{not json"), "not valid JSON"),
    (lambda d: write_dir(d, format_version=0), "format_version 0"),
    (lambda d: write_dir(d, profile="huge"), "unknown profile"),
    (lambda d: write_dir(d, profile="full"), "lacks models"),
    (lambda d: (d / "saliency.onnx").unlink(), "missing: the engines dir is incomplete"),
    (lambda d: (d / "saliency.onnx").write_bytes(b"tampered"), "fails its sha256 check"),
    (lambda d: write_dir(d, format_version=str(mf.FORMAT_VERSION)), "format_version the string"),
    (lambda d: write_dir(d, profile=["lite"]), "unknown profile"),
    (lambda d: write_dir(d, models="saliency.onnx"), "'models' must be an object"),
    (lambda d: write_dir(d, files=["tokenizer.json"]), "'files' must be an object"),
    (lambda d: write_dir(d, models={"saliency": {"file": "saliency.onnx"}}), "models.saliency needs a file name and its sha256"),
    (lambda d: write_dir(d, preprocess={"saliency": {"single_size": "abc"}}), "must be a positive integer"),
    (lambda d: write_dir(d, preprocess={"saliency": {"mean": [1.0, 2.0]}}), "must be 3 finite numbers"),
    (lambda d: write_dir(d, preprocess={"saliency": {"std": [0.0, 0.0, 0.0]}}), "standard deviation must be > 0"),
    (lambda d: write_dir(d, preprocess={"sam": {"mask_threshold": "x"}}), "must be a finite number"),
    (lambda d: write_dir(d, preprocess={"gdino": {"short_side": 0}}), "must be a positive integer"),
])
def test_faults_are_named(tmp_path, change, message):
    write_dir(tmp_path)
    change(tmp_path)
    with pytest.raises(ManifestError, match=message):
        mf.load_manifest(tmp_path)


def test_missing_dir_and_error_family(tmp_path):
    with pytest.raises(SaaError, match="does not exist"):
        mf.load_manifest(tmp_path / "nope")
    (tmp_path / "README.md").write_text("x")
    with pytest.raises(ManifestError, match="is a file"):
        mf.load_manifest(tmp_path / "README.md")
