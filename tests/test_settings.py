"""EngineSettings: every switch is one field, reached the same way from the CLI, Python and the C ABI."""
from __future__ import annotations

from pathlib import Path

import pytest

from runtime import calibrate, infer, memory
from runtime.errors import ConfigError
from runtime.ops import CPU_LIBRARY
from runtime.settings import EngineSettings, parse_value, setting_fields, settings_from_args

# A value for every field that a CPU pipeline can open with (the GPU paths forced on the CPU provider).
def every_switch(tmp_path: Path) -> dict:
    return {"device": "cpu", "threads": 1, "io_binding": True, "static_shapes": True, "cuda_graphs": True,
            "overlap": True, "device_canvas": True, "cuda_tf32": "head", "cudnn_search": "EXHAUSTIVE",
            "ort_profile": str(tmp_path / "profile"), "gemm_backend": "numpy", "ops_library": str(CPU_LIBRARY)}


def test_every_field_has_a_value_in_these_tests(tmp_path):
    assert sorted(every_switch(tmp_path)) == sorted(spec.name for spec in setting_fields())


def as_flags(values: dict) -> list[str]:
    flags = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


@pytest.mark.parametrize("door", [infer, calibrate, memory], ids=["infer", "calibrate", "memory"])
def test_every_switch_is_a_flag_of_every_command(door, tmp_path):
    values = every_switch(tmp_path)
    parser = door.build_parser()
    required = {infer: ["x.png", "--out", "o"], calibrate: ["--good", "g", "--out", "c.json"],
                memory: ["--good", "g", "--out", "m.npz"]}[door]
    args = parser.parse_args(["--engine-dir", "e", *required, *as_flags(values)])
    assert settings_from_args(args, environ={}).to_json() == values
    assert parser.parse_args(["--engine-dir", "e", *required, "--no-overlap"]).overlap is False


def test_a_flag_left_out_takes_its_variable_then_its_default(tmp_path):
    args = infer.build_parser().parse_args(["x.png", "--engine-dir", "e", "--out", "o", "--cuda-tf32", "off"])
    settings = settings_from_args(args, environ={"SAA_CUDA_TF32": "on", "SAA_GEMM_BACKEND": "numpy"})
    assert (settings.cuda_tf32, settings.gemm_backend) == ("off", "numpy")  # the flag wins, the variable fills in
    assert settings.resolved().cudnn_search == "HEURISTIC" and settings.resolved().overlap is False


def test_the_python_api_takes_every_switch_and_applies_it(lite_engine_dir, data_dir, tmp_path):
    from runtime.image_io import read_image
    from runtime.pipeline import Pipeline

    values = every_switch(tmp_path)
    image = read_image(data_dir / "mtd_break_exp6_num_348888.jpg")
    with Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", **values) as pipeline:
        assert pipeline.settings.to_json() == values
        assert pipeline.saliency.gemm_backend == "numpy" and pipeline.saliency.knn_session is not None  # GPU paths
        pipeline(image)
    assert list((tmp_path / "profile").glob("saliency*.json"))  # onnxruntime profiled the saliency CNN there
    settings = EngineSettings(**values)
    with Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", settings=settings, overlap=False) as pipeline:
        assert pipeline.settings == settings.with_changes(overlap=False)  # keywords over a settings object


def test_unknown_or_impossible_settings_are_named():
    with pytest.raises(ConfigError, match=r"unknown settings \['cuda_graph'\]"):
        EngineSettings.from_environment({}, cuda_graph=True)
    with pytest.raises(ConfigError, match="unknown setting 'speed'"):
        EngineSettings.parse("speed=max", {})
    with pytest.raises(ConfigError, match="expected key=value"):
        EngineSettings.parse("overlap", {})
    with pytest.raises(ConfigError, match="overlap='maybe': expected 1/0, on/off or true/false"):
        parse_value("overlap", "maybe", source="setting")
    with pytest.raises(ConfigError, match="threads must be an integer from 0"):
        EngineSettings(threads=-1)
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        EngineSettings(device="gpu")
    with pytest.raises(ConfigError, match="setting overlap must be true or false"):
        EngineSettings(overlap="yes")
    with pytest.raises(ConfigError, match="CUDA graphs need the GPU paths"):
        EngineSettings(cuda_graphs=True).resolved()  # on the CPU the GPU paths are off unless io_binding asks


def test_the_c_abi_takes_every_switch_as_a_settings_string(lite_engine_dir, tmp_path, monkeypatch):
    from runtime.capi import CapiError, CPipeline, _host, abi

    opened = []
    real_open = _host.Pipeline.open

    def recording_open(*args, **kwargs):
        pipeline = real_open(*args, **kwargs)
        opened.append(pipeline.settings)
        return pipeline

    monkeypatch.setattr(_host.Pipeline, "open", recording_open)
    values = every_switch(tmp_path)
    text = ",".join(f"{name}={'on' if value is True else value}" for name, value in values.items()
                    if name not in ("device", "threads"))
    with CPipeline.open(str(lite_engine_dir), dataset="mtd", category="mtd", threads=1, settings=text):
        pass
    assert opened[-1].to_json() == values
    with pytest.raises(CapiError, match="cuda_tf32='sometimes'") as caught:
        CPipeline.open(str(lite_engine_dir), dataset="mtd", category="mtd", settings="cuda_tf32=sometimes")
    assert caught.value.status == abi.E_CONFIG
