"""The latency benchmark in CI size: lite engines, 2 calls, the PyTorch reference in the same run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import latency as L

REPO = Path(__file__).resolve().parent.parent
TOP_KEYS = ("device", "device_name", "sam_variant", "precision", "random_weights", "end_to_end_p50_ms",
            "end_to_end_p95_ms", "images_per_s", "speedup_vs_reference", "stages", "versions", "peak_rss_mb",
            "load_average", "cpu_model", "reference")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.latency", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def lite_result(lite_engine_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latency") / "result.json"
    done = run_cli("--engine-dir", str(lite_engine_dir), "--device", "cpu", "--iters", "2", "--warmup", "1",
                   "--reference", "--reference-iters", "1", "--threads", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_cli_writes_the_schema_and_runs_the_reference(lite_result):
    record, table = lite_result
    assert all(key in record for key in TOP_KEYS), sorted(set(TOP_KEYS) - set(record))
    assert record["device"] == "cpu" and record["profile"] == "lite" and record["precision"] == "fp32"
    assert record["sam_variant"] is None and record["random_weights"] is False
    assert record["iters"] == 2 and record["stages"]["end_to_end"]["n"] == 2
    for stage in ("preprocess", "saliency", "end_to_end"):
        stats = record["stages"][stage]
        assert 0 <= stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]
    assert record["end_to_end_p50_ms"] == record["stages"]["end_to_end"]["p50_ms"] > 0
    assert record["images_per_s"] > 0 and record["peak_rss_mb"] > 0
    assert record["first_call_ms"] > 0  # the first call after opening, what a line's first part pays
    reference = record["reference"]
    assert reference["ran"] and reference["iters"] == 1
    assert reference["parity_max_abs_diff"]["saliency"] < 1e-4  # the torch model rebuilt from the manifest is the engine's
    # The runtime and the reference computed the same saliency map on the same image.
    assert reference["map"] == "saliency" and reference["map_max_abs_diff"] < 1e-4
    assert reference["comparison"]["differing_pixel_share"] == 0.0 and "boxes" not in reference["comparison"]
    assert record["speedup_vs_reference"] > 0
    assert record["stages"]["saliency"]["speedup"] > 0 and record["stages"]["saliency"]["reference_p50_ms"] > 0
    assert "speed-up vs the PyTorch reference" in table and "saliency" in table


def test_cli_names_its_file_by_device_profile_precision_and_date(lite_engine_dir, tmp_path, capsys):
    assert L.main(["--engine-dir", str(lite_engine_dir), "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    assert "end to end p50" in capsys.readouterr().out
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert path.name == f"latency_cpu_lite_fp32_{record['created'][:10]}.json"
    assert record["speedup_vs_reference"] is None and record["reference"] == {"ran": False}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--engine-dir", "/nonexistent/engines"), "does not exist"),
        (("--engine-dir", "{lite}", "--iters", "0"), "--iters must be >= 1"),
        (("--engine-dir", "{lite}", "--config", "x.yaml", "--dataset", "mvtec"), "not both"),
        (("--engine-dir", "{lite}", "--image", "/nonexistent.png"), "no such file"),
        (("--engine-dir", "{lite}", "--threads", "-1"), "threads must be an integer from 0"),
        (("--engine-dir", "{lite}", "--option", "object_iou_threshold=abc"), "object_iou_threshold"),
    ],
)
def test_cli_bad_input_is_one_line(lite_engine_dir, args, message, capsys):
    assert L.main([*(a.format(lite=lite_engine_dir) for a in args), "--no-write"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_an_output_folder_that_cannot_be_made_stops_before_timing(lite_engine_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert L.main(["--engine-dir", str(lite_engine_dir), "--out", str(tmp_path / "file" / "run.json")]) == 2
    assert "--out: cannot create the folder" in capsys.readouterr().err


def test_summaries_and_stage_groups():
    stats = L.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert stats["p50_ms"] == 3.0 and stats["n"] == 5 and stats["min_ms"] == 1.0
    assert stats["p95_ms"] == pytest.approx(np.percentile([1, 2, 3, 4, 100], 95), abs=1e-3)
    runtime = [{"detector_image": 2.0, "detector_prompts": 3.0, "end_to_end": 10.0},
               {"detector_image": 4.0, "detector_prompts": 1.0, "end_to_end": 20.0}]
    assert L.stage_series(runtime, ("detector_image", "detector_prompts")) == [5.0, 5.0]
    stages = L.runtime_stages(runtime)
    assert stages["detector"]["p50_ms"] == 5.0 and stages["detector"]["sum_of"] == ["detector_image", "detector_prompts"]
    compared = L.compare_stages(runtime, [{"detector": 50.0, "total": 150.0}, {"detector": 50.0, "total": 150.0}])
    assert compared["detector"]["speedup"] == 10.0 and compared["total"]["speedup"] == 10.0
    assert "sam" not in compared  # the reference did not time it
    with pytest.raises(L.BenchError):
        L.summarize([])
    engine = [{"detector_image": 1.0, "detector_prompts": 3.0, "end_to_end": 4.0},
              {"detector_image": 2.0, "detector_prompts": 0.5, "end_to_end": 2.5}]
    L.add_engine_shares(stages, engine)
    assert stages["detector_image"]["engine_p50_ms"] == 1.5 and stages["detector"]["engine_p50_ms"] == 3.25
    assert stages["end_to_end"]["engine_p50_ms"] == 3.25


def test_result_path():
    record = {"device": "cuda", "profile": "full", "sam_variant": "vit_h", "precision": "fp16", "created": "2026-01-02T03:04:05"}
    assert L.result_path(Path("bench/results"), record).name == "latency_cuda_full-vit-h_fp16_2026-01-02.json"
    assert L.result_path(Path("x/y.json"), record) == Path("x/y.json")


def test_reference_rebuild_check_fails_on_other_weights(lite_engine_dir):
    torch = pytest.importorskip("torch")
    from bench.reference.load import ReferenceLoadError, check_parity, load_reference_models

    torch.set_num_threads(1)
    models = load_reference_models(lite_engine_dir)
    assert check_parity(models)["saliency"] < 1e-4
    with torch.no_grad():
        next(models.cnn.parameters()).mul_(1.5)  # weights the engines do not hold
    with pytest.raises(ReferenceLoadError, match="differs from saliency.onnx.*version may build the model differently"):
        check_parity(models)


def test_reference_process_runs_apart_and_reports_failures(lite_engine_dir, tmp_path):
    import os

    from bench.reference.worker import ReferenceProcess, ReferenceProcessError
    from runtime.config import resolve_config
    from runtime.image_io import read_image

    config = resolve_config("mvtec", "bottle", None, None)
    image = read_image(Path(__file__).resolve().parent / "data" / "bottle_demo.png")
    with ReferenceProcess(lite_engine_dir, config, threads=1) as reference:
        assert reference.ready["parity"]["saliency"] < 1e-4
        out = reference(image)
        assert out["saliency_map"].shape == image.shape[:2] and out["timings_ms"]["total"] > 0
        stats = reference.stats()
        assert reference._process.pid != os.getpid() and 100 < stats["peak_rss_mb"] < 20000
    assert reference._process.poll() is not None  # stopped on leaving the block
    with pytest.raises(ReferenceProcessError, match="manifest"):
        ReferenceProcess(tmp_path / "no-engines", config, threads=1)


@pytest.mark.slow
def test_cli_full_tiny_pipeline_against_the_reference(full_tiny_engine_dir, tmp_path):
    out = tmp_path / "full.json"
    done = run_cli("--engine-dir", str(full_tiny_engine_dir), "--iters", "2", "--warmup", "1", "--reference",
                   "--reference-iters", "1", "--threads", "2", "--out", str(out), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["profile"] == "full" and record["sam_variant"] == "tiny" and record["random_weights"] is True
    assert record["static_shapes"] == {"head": {}, "decoder_boxes": None, "refused": None}  # CPU: dynamic shapes
    assert isinstance(record["environment"], dict)
    assert record["text_ms"] is not None and record["text_ms"] > 0
    assert {"detector_image", "detector_prompts", "sam_encoder", "saliency", "fusion", "detector"} <= set(record["stages"])
    assert set(record["reference"]["parity_max_abs_diff"]) == {"gdino_text", "gdino_image", "gdino_head", "sam_encoder",
                                                               "sam_decoder", "saliency"}
    assert record["stages"]["detector"]["speedup"] > 0 and record["speedup_vs_reference"] > 0
    # The same boxes went to SAM with the same scores and the same top-k fused; the map differs at
    # most at a few mask-edge pixels (0.001% in a run here), whatever its largest difference there.
    comparison = record["reference"]["comparison"]
    boxes = comparison["boxes"]
    assert boxes["matched"] == boxes["reference_boxes"] == boxes["runtime_boxes"] > 0 and boxes["same_top_k"]
    assert boxes["matched_score_max_abs_diff"] < 1e-4 and comparison["differing_pixel_share"] < 1e-3
    # Each stage's onnxruntime share is part of its time; regions and fusion run no graph on the CPU.
    for stage in ("detector_image", "detector_prompts", "sam_encoder", "sam_decoder", "saliency", "end_to_end"):
        stats = record["stages"][stage]
        assert 0 < stats["engine_p50_ms"] <= stats["p50_ms"] * 1.001, (stage, stats)
    assert record["stages"]["regions"]["engine_p50_ms"] == record["stages"]["fusion"]["engine_p50_ms"] == 0.0


def test_gpu_facts_from_nvidia_smi(tmp_path, monkeypatch):
    """Parsing only (a stand-in nvidia-smi): name, driver, memory per process or, hidden pids, per GPU."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\ncase "$1" in\n  --query-compute-apps*) echo "999, 10";;\n'
                    '  --query-gpu=index*) echo "0, 1234";;\n  *) echo "NVIDIA H100 80GB HBM3, 550.54, 81559";;\nesac\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    assert L.gpu_info() == {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54", "memory_total_mb": 81559.0}
    assert L.gpu_memory_used_mb(999) == 10.0
    assert L.gpu_memory_used_mb(12345) == 1234.0  # our pid not listed (container): GPU 0 as a whole
