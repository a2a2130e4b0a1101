"""bench/gpu/kernel_times.py: device time per stage from a torch profiler trace (CUPTI on a machine with a GPU)."""
import json

import pytest

from bench.gpu import kernel_times as K


def _span(name, ts, dur, cat="user_annotation"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {}}


def _kernel(name, ts, dur):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": 7}}


def test_kernels_are_charged_to_the_stage_window_holding_their_start():
    gemm = "void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm<float, 4> >(Params<int>)"
    events = [
        _kernel(gemm, 5, 100),  # before the first call (warm-up): left out
        _span(K.CALL, 100, 1000), _span(K.STAGE_PREFIX + "sam_encoder", 110, 600), _span(K.STAGE_PREFIX + "fusion", 720, 300),
        _kernel(gemm, 120, 300), _kernel("void onnxruntime::cuda::_TransposeKernel<float>(int)", 450, 100),
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 115, "dur": 60, "args": {"bytes": 4_000_000}},
        _kernel("reduce_kernel", 730, 150),
        _kernel("between_stages", 712, 4),
        _span(K.CALL, 2000, 1400), _span(K.STAGE_PREFIX + "sam_encoder", 2010, 800), _span(K.STAGE_PREFIX + "fusion", 2820, 500),
        _kernel(gemm, 2020, 500), _kernel("reduce_kernel", 2830, 250),
        _span("aten::mm", 2020, 5, cat="cpu_op"),
    ]
    got = K.summarise_trace(events)
    assert got["calls"] == 2 and got["call_wall_p50_ms"] == 1.2
    encoder, fusion = got["stages"]["sam_encoder"], got["stages"]["fusion"]
    assert encoder["wall_p50_ms"] == 0.7 and encoder["kernel_ms_per_call"] == 0.45  # (300 + 100 + 500) / 2 calls
    assert encoder["kernels_per_call"] == 1.5 and encoder["copy_ms_per_call"] == 0.03 and encoder["copy_mb_per_call"] == 2.0
    assert encoder["busy_share"] == round((900 + 60) / 1400, 3)
    assert list(encoder["top_kernels_ms_per_call"]) == ["cutlass::Kernel2", "onnxruntime::cuda::_TransposeKernel"]
    assert encoder["top_kernels_ms_per_call"]["cutlass::Kernel2"] == 0.4
    assert fusion["kernel_ms_per_call"] == 0.2 and fusion["busy_share"] == 0.5
    assert got["stages"]["outside stages"]["kernel_ms_per_call"] == 0.002 and got["stages"]["outside stages"]["wall_p50_ms"] is None
    assert got["device_busy_ms_per_call"] == round((300 + 100 + 60 + 150 + 4 + 500 + 250) / 2 / 1000, 3)


def test_kernel_names_shorten_to_the_function():
    assert K.short_kernel_name("void at::native::(anonymous namespace)::softmax_warp_forward<c10::Half, float, 10>(T*, int)") \
        == "at::native::(anonymous namespace)::softmax_warp_forward"
    assert K.short_kernel_name("sm90_xmma_gemm_f16f16_f32") == "sm90_xmma_gemm_f16f16_f32"
    assert K.short_kernel_name("<<<>>>") == "<<<>>>"


def test_a_cpu_run_records_every_stage_window_and_says_no_kernels(lite_engine_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "kernels.json"
    out.write_text(json.dumps({"vit_h": {"calls": 9}}))
    assert K.main(["--engine-dir", str(lite_engine_dir), "--device", "cpu", "--iters", "2", "--warmup", "1",
                   "--label", "lite", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["vit_h"] == {"calls": 9}  # other labels kept
    lite = written["lite"]
    assert lite["calls"] == 2 and set(lite["stages"]) == {"preprocess", "saliency"}
    assert lite["stages"]["saliency"]["wall_p50_ms"] > 0 and lite["stages"]["saliency"]["kernels_per_call"] == 0
    assert "no kernels were recorded" in lite["notes"][0]
    assert lite["onnxruntime"] and isinstance(lite["switches"], dict)
    assert "saliency" in capsys.readouterr().out
    import runtime.pipeline

    assert runtime.pipeline.timed.__name__ == "timed"  # the stage windows are gone again


def test_a_missing_engine_dir_is_one_line(tmp_path, capsys):
    pytest.importorskip("torch")
    code = K.main(["--engine-dir", str(tmp_path / "nowhere"), "--device", "cpu", "--out", str(tmp_path / "k.json")])
    assert code == 1 and capsys.readouterr().err.startswith("error: ") and not (tmp_path / "k.json").exists()


@pytest.mark.gpu
def test_cupti_sees_the_kernels_onnxruntime_launches(full_tiny_engine_dir):
    """On a machine with a GPU (`pytest -m gpu`): `python -m bench.gpu`'s kernel step relies on this."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    from pathlib import Path

    image = Path(__file__).resolve().parent / "data" / "bottle_demo.png"
    summary = K.profile_kernels(full_tiny_engine_dir, "cuda", image, "mvtec", "bottle", iters=2, warmup=1)
    stages = summary["stages"]
    assert stages["sam_encoder"]["kernels_per_call"] > 0, summary["notes"]
    assert 0 < stages["sam_encoder"]["kernel_ms_per_call"] <= stages["sam_encoder"]["wall_p50_ms"] * 1.5


def test_joined_captions_and_settings_are_profiled_with_the_overlap_off(full_tiny_engine_dir, tmp_path):
    """The kernel step of `python -m bench.gpu` profiles its fastest configuration: joined captions
    and EngineSettings fields reach the pipeline; the overlap is turned off (its second thread's
    kernels would land in the main thread's stage windows) and the record says so."""
    pytest.importorskip("torch")
    out = tmp_path / "kernels.json"
    assert K.main(["--engine-dir", str(full_tiny_engine_dir), "--device", "cpu", "--iters", "1", "--warmup", "1",
                   "--setting", "io_binding=true", "--setting", "overlap=true", "--setting", "static_shapes=on",
                   "--option", "joined_captions=true", "--label", "joined", "--out", str(out)]) == 0
    joined = json.loads(out.read_text())["joined"]
    assert joined["options"] == {"joined_captions": True} and joined["overlap_asked"] is True
    assert joined["settings"]["overlap"] is False and joined["settings"]["io_binding"] is True
    assert joined["settings"]["static_shapes"] is True and "profiled with it off" in joined["notes"][0]
    assert {"detector_prompts", "sam_decoder", "fusion"} <= set(joined["stages"])


def test_bad_settings_are_one_line(full_tiny_engine_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    for bad in ("cuda_graphs=maybe", "device=cuda", "nonsense=1", "nonsense"):
        code = K.main(["--engine-dir", str(full_tiny_engine_dir), "--device", "cpu", "--setting", bad,
                       "--out", str(tmp_path / "k.json")])
        assert code == 1 and capsys.readouterr().err.startswith("error: ")
