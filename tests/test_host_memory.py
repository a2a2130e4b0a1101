"""Masks that would not fit in host memory are refused with a message, not an OOM kill."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.engine import host_memory
from runtime.errors import ImageError
from runtime.image_io import read_image

BOTTLE = Path(__file__).resolve().parent / "data" / "bottle_demo.png"


def test_a_cgroup_limit_caps_what_the_host_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(host_memory, "_CGROUP", tmp_path)
    host = host_memory.available_bytes()
    assert host is None or host > 0
    (tmp_path / "memory.max").write_text("3000000000\n")
    (tmp_path / "memory.current").write_text("1000000000\n")
    capped = host_memory.available_bytes()
    assert capped == (2_000_000_000 if host is None else min(host, 2_000_000_000))
    (tmp_path / "memory.max").write_text("max\n")  # no limit set: the host's figure alone
    assert host_memory.available_bytes() == host


def test_mask_bytes_grow_with_regions_and_pixels():
    fixed = host_memory.FIXED_BYTES
    assert host_memory.mask_bytes(82, (8000, 8000)) == 82 * 64_000_000 + 32 * 64_000_000 + fixed
    assert host_memory.mask_bytes(0, (10, 10)) == 3200 + fixed


def test_the_memory_bench_measures_one_call_against_the_estimate(full_tiny_engine_dir, lite_engine_dir, tmp_path,
                                                                 capsys):
    from bench.experiments import host_memory as bench

    out = tmp_path / "memory.json"
    assert bench.main(["--engine-dir", str(full_tiny_engine_dir), "--sizes", "1200", "--out", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["size"] == 1200 and run["regions"] > 0 and run["call_mb"] > 0
    expected = host_memory.mask_bytes(run["regions"], (1200, 1200)) / 2**20
    assert run["estimate_mb"] == pytest.approx(expected, abs=1e-3)
    assert run["measured_over_estimate"] == pytest.approx(run["call_mb"] / run["estimate_mb"], rel=1e-2)
    with pytest.raises(SystemExit):
        bench.main(["--engine-dir", str(lite_engine_dir)])
    assert "masks exist only in the full profile" in capsys.readouterr().err


def test_pipeline_refuses_masks_that_would_not_fit(full_tiny_engine_dir, monkeypatch):
    from runtime import manifest as mf
    from runtime import pipeline
    from runtime.engine import host_memory
    from runtime.config import resolve_config

    config = resolve_config("mvtec", "bottle", None, {})
    run = pipeline.Pipeline(mf.load_manifest(full_tiny_engine_dir), config, threads=1)
    image = read_image(BOTTLE)
    result = run(image)
    assert result.regions  # the check below has regions to refuse
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 1_000_000)
    with pytest.raises(ImageError, match=r"regions at 900x900 need about .* GiB of masks, more than the 0\.0 GiB"):
        run(image)
    monkeypatch.setattr(host_memory, "available_bytes", lambda: None)  # unknown (not Linux): no check
    assert run(image).regions
