"""Session options per device, and IO binding (DeviceRunner) checked on the CPU provider."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime.engine import clock as C
from runtime.engine import runners as R
from runtime.engine import sessions as S
from runtime.engine.sessions import session_factory
from runtime.settings import EngineSettings
from runtime.errors import ConfigError, EngineError
from runtime.engine.sessions import builtin_graph

_GEMM_ONNX = builtin_graph("gemm_transposed")  # a one-node graph y = a @ b.T


def gemm_session() -> ort.InferenceSession:
    return ort.InferenceSession(_GEMM_ONNX, S.session_options(threads=1), providers=["CPUExecutionProvider"])


def test_devices_and_missing_providers(monkeypatch):
    assert S.providers_for("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(EngineError, match="unknown device 'gpu'"):
        S.providers_for("gpu")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(EngineError, match="onnxruntime-gpu"):
        session_factory(EngineSettings(device="cuda"))
    with pytest.raises(EngineError, match="TensorRT"):
        S.providers_for("tensorrt")


def test_tensorrt_options_keep_caches_in_the_engines_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    (trt, trt_options), (cuda, _), cpu = S.providers_for("tensorrt", tmp_path / S.TRT_CACHE_DIR)
    assert (trt, cuda, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert trt_options["trt_fp16_enable"] == "True" and trt_options["trt_engine_cache_enable"] == "True"
    assert trt_options["trt_engine_cache_path"] == str(tmp_path / S.TRT_CACHE_DIR) == trt_options["trt_timing_cache_path"]
    assert (tmp_path / S.TRT_CACHE_DIR).is_dir()
    (_, cuda_options), _ = S.providers_for("cuda", cuda_graph=True)
    assert cuda_options["enable_cuda_graph"] == "1"


def test_cuda_keeps_fp32_matmuls_out_of_tf32_unless_asked(monkeypatch):
    # onnxruntime's own default is TF32 on: on an H200 that changed the tiny pipeline's regions
    # (bench/results/tf32_check_cuda-h200_2026-11-26.json).
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    def tf32(graph=None, **given):
        return S.providers_for("cuda", graph=graph, settings=EngineSettings(device="cuda", **given))[0][1]["use_tf32"]

    assert tf32() == "0" and tf32(cuda_tf32="off") == "0"
    assert tf32(cuda_tf32="on") == "1"
    # only GroundingDINO's fp32 head: the kNN graph stays exact
    assert [tf32(name, cuda_tf32="head") for name in ("gdino_head", "sam_decoder", None)] == ["1", "0", "0"]
    opened = {}
    monkeypatch.setattr(ort, "InferenceSession", lambda path, options, providers: opened.update({path: providers}))
    make = session_factory(EngineSettings(device="cuda", cuda_tf32="head"))
    for name in ("gdino_head", "gdino_image"):  # the factory names each graph by its file
        make(Path(f"engines/{name}.onnx"))
    assert [opened[f"engines/{n}.onnx"][0][1]["use_tf32"] for n in ("gdino_head", "gdino_image")] == ["1", "0"]
    with pytest.raises(ConfigError, match="cuda_tf32='yes'"):
        EngineSettings(device="cuda", cuda_tf32="yes")
    assert S.providers_for("cpu", settings=EngineSettings(cuda_tf32="on")) == ["CPUExecutionProvider"]
    cudnn = S.providers_for("cuda", settings=EngineSettings(device="cuda", cudnn_search="EXHAUSTIVE"))
    assert cudnn[0][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert S.providers_for("cuda")[0][1]["cudnn_conv_algo_search"] == "HEURISTIC"
    with pytest.raises(ConfigError, match="cudnn_search='fastest'"):
        EngineSettings(device="cuda", cudnn_search="fastest")


def test_the_environment_sets_what_the_caller_left_unset():
    environ = {"SAA_CUDA_TF32": "1", "SAA_CUDNN_SEARCH": "EXHAUSTIVE", "SAA_OVERLAP": "1"}
    settings = EngineSettings.from_environment(environ, device="cuda", overlap=False)
    assert (settings.cuda_tf32, settings.cudnn_search, settings.overlap) == ("on", "EXHAUSTIVE", False)
    assert EngineSettings.from_environment({"SAA_CUDA_TF32": "head"}).cuda_tf32 == "head"
    with pytest.raises(ConfigError, match="SAA_CUDA_TF32: cuda_tf32='yes'"):
        EngineSettings.from_environment({"SAA_CUDA_TF32": "yes"})
    with pytest.raises(ConfigError, match="SAA_CUDNN_SEARCH: cudnn_search='fastest'"):
        EngineSettings.from_environment({"SAA_CUDNN_SEARCH": "fastest"})
    # A variable set for a GPU process leaves a CPU one as it was.
    cpu = EngineSettings.from_environment({"SAA_CUDA_GRAPHS": "1", "SAA_STATIC_SHAPES": "1", "SAA_DEVICE_CANVAS": "1"})
    assert (cpu.cuda_graphs, cpu.static_shapes, cpu.device_canvas) == (None, None, None)
    gpu = EngineSettings.from_environment({"SAA_CUDA_GRAPHS": "1", "SAA_STATIC_SHAPES": "0"}, device="cuda")
    assert gpu.cuda_graphs is True and gpu.resolved().static_shapes is False
    assert EngineSettings(device="cuda").resolved().static_shapes is True
    assert EngineSettings().resolved().static_shapes is False


def test_cpu_sessions_do_not_spin(tmp_path):
    path = tmp_path / "gemm.onnx"
    path.write_bytes(_GEMM_ONNX)
    session = session_factory(EngineSettings(threads=2))(path)
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert R.session_device(session) == "cpu"
    with pytest.raises(EngineError, match="cannot load engine"):
        session_factory()(tmp_path / "missing.onnx")


@pytest.mark.parametrize(("threads", "cpus", "expected"), [
    (2, {0, 1}, "2"),  # the one worker on the second CPU (onnxruntime counts from 1)
    (4, {4, 5, 6, 7}, "6;7;8"),  # a restricted set (taskset): the workers on all but its first CPU
    (3, {4, 5, 6, 7}, None),  # fewer threads than CPUs: the OS spreads them
    (2, {3}, None),  # more threads than CPUs
    (1, {0}, None),  # no worker thread
])
def test_workers_are_pinned_only_when_the_threads_take_every_cpu(threads, cpus, expected):
    assert S.worker_affinities(threads, cpus) == expected


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_sessions_accept_their_affinities(threads, tmp_path, monkeypatch):
    """onnxruntime refuses a session whose affinity string does not give one entry per worker."""
    path = tmp_path / "gemm.onnx"
    path.write_bytes(_GEMM_ONNX)
    monkeypatch.setattr(S.os, "sched_getaffinity", lambda pid: set(range(threads)), raising=False)
    session = session_factory(EngineSettings(threads=threads))(path)
    entry = session.get_session_options().get_session_config_entry("session.intra_op_thread_affinities") if threads > 1 else None
    assert entry == S.worker_affinities(threads, set(range(threads)))
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(session.run(None, {"a": a, "b": a})[0], a @ a.T)


def test_device_runner_matches_run_and_chains_device_values():
    session = gemm_session()
    runner = R.DeviceRunner(session)
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(shape).astype(np.float32) for shape in [(3, 5), (4, 5), (2, 4)])
    (plain,) = session.run(None, {"a": a, "b": b})
    (bound,) = runner.run(["y"], {"a": a, "b": b})
    np.testing.assert_array_equal(bound, plain)
    # Kept on the device: an OrtValue, fed as is to the next call (y2 = c @ y.T).
    (kept,) = runner.run(["y"], {"a": a, "b": b}, keep=("y",))
    assert isinstance(kept, ort.OrtValue) and tuple(kept.shape()) == (3, 4)
    (chained,) = runner.run(["y"], {"a": c, "b": kept})
    np.testing.assert_allclose(chained, c @ plain.T, rtol=1e-5, atol=1e-5)


def test_static_device_runner_holds_its_buffers():
    """static=True (CUDA graphs): same input and output buffers every call, new values in them."""
    runner = R.DeviceRunner(gemm_session(), static=True)
    a, b = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
    np.testing.assert_array_equal(runner.run(["y"], {"a": a, "b": b})[0], np.full((2, 4), 3.0))
    (kept,) = runner.run(["y"], {"a": 2 * a, "b": b}, keep=("y",))  # same buffers, new values
    np.testing.assert_array_equal(kept.numpy(), np.full((2, 4), 6.0))
    (again,) = runner.run(["y"], {"a": 3 * a, "b": b}, keep=("y",))
    assert again.data_ptr() == kept.data_ptr()  # the one held output buffer ...
    np.testing.assert_array_equal(kept.numpy(), np.full((2, 4), 9.0))  # ... so read it before the next run
    with pytest.raises(EngineError, match="differs from the first call"):
        runner.run(["y"], {"a": np.ones((5, 3), np.float32), "b": b})
    # A static downstream graph takes the upstream's held output, and nothing else.
    downstream = R.DeviceRunner(gemm_session(), static=True)
    c = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(downstream.run(["y"], {"a": c, "b": kept})[0], np.full((1, 2), 36.0))
    runner.run(["y"], {"a": a, "b": b}, keep=("y",))
    np.testing.assert_array_equal(downstream.run(["y"], {"a": c, "b": kept})[0], np.full((1, 2), 12.0))
    other = ort.OrtValue.ortvalue_from_numpy(np.ones((2, 4), np.float32))
    with pytest.raises(EngineError, match="different device buffer"):
        downstream.run(["y"], {"a": c, "b": other})
    assert isinstance(R.runner_for(gemm_session(), io_binding=True, static=True), R.DeviceRunner)
    assert (a == 1).all() and (b == 1).all()  # the caller's arrays were copied, never written


def test_device_runner_counts_its_input_copies_as_engine_time(monkeypatch):
    """Binding copies host inputs to the device, as PlainRunner's session.run does inside the
    run: both runners put that on the engine clock, so a stage's host share is host work only."""
    import time

    runner = R.DeviceRunner(gemm_session(), static=True)
    slow_copy = runner._bind_input

    def bind(name, value):
        time.sleep(0.05)
        slow_copy(name, value)

    monkeypatch.setattr(runner, "_bind_input", bind)
    before = C.ENGINE_CLOCK.ms
    runner.run(["y"], {"a": np.ones((2, 3), np.float32), "b": np.ones((4, 3), np.float32)})
    assert C.ENGINE_CLOCK.ms - before >= 100.0  # two inputs, 50 ms each


@pytest.mark.gpu
def test_device_runner_keeps_outputs_on_the_gpu():
    session = ort.InferenceSession(_GEMM_ONNX, S.session_options(), providers=S.providers_for("cuda"))
    runner = R.DeviceRunner(session)
    a, b = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
    (kept,) = runner.run(["y"], {"a": a, "b": b}, keep=("y",))
    assert kept.device_name().lower() == "cuda"
    (chained,) = runner.run(["y"], {"a": np.ones((1, 4), np.float32), "b": kept})
    np.testing.assert_array_equal(chained, np.full((1, 2), 12.0))


@pytest.mark.gpu
def test_knn_graph_on_the_gpu_matches_the_twin():
    from runtime.stages import saliency_kernels as K

    rng = np.random.default_rng(0)
    features = np.maximum(rng.standard_normal((176, 4096)), 0).astype(np.float32) + np.float32(1e-3)
    features /= np.linalg.norm(features, axis=0, keepdims=True)
    for mode in K.MODES:
        got = K.knn_distance_mean_graph(features, 400, mode, session=K.knn_session("cuda"))
        np.testing.assert_allclose(got, K.knn_distance_mean_twin(features, 400, mode), atol=1e-5, rtol=0)


def test_cpu_sessions_share_one_arena(tmp_path):
    path = tmp_path / "gemm.onnx"
    path.write_bytes(_GEMM_ONNX)
    make = session_factory(EngineSettings(threads=1))
    first, second = make(path), make(path)
    assert S._shared_cpu_arena  # registered once for the process
    for session in (first, second):
        entries = session.get_session_options().get_session_config_entry("session.use_env_allocators")
        assert entries == "1"
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    (out,) = second.run(None, {i.name: a for i in second.get_inputs()})
    np.testing.assert_allclose(out, a @ a.T)
