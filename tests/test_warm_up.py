"""Pipeline.warm_up and saa_open_options.warm_up: the first part is not the slowest, and nothing changes."""
from pathlib import Path

import numpy as np

from runtime.image_io import read_image
from runtime.pipeline import Pipeline

BOTTLE = Path(__file__).resolve().parent / "data" / "bottle_demo.png"


def test_warm_up_runs_every_stage_and_changes_no_result(full_tiny_engine_dir, monkeypatch):
    image = read_image(BOTTLE)
    cold = Pipeline.open(full_tiny_engine_dir, dataset="mvtec", category="bottle")
    expected = cold(image)
    warmed = Pipeline.open(full_tiny_engine_dir, dataset="mvtec", category="bottle")
    decoder_calls = []
    real_predict = warmed.segmenter.predict_boxes
    monkeypatch.setattr(warmed.segmenter, "predict_boxes", lambda *a, **k: decoder_calls.append(1) or real_predict(*a, **k))
    assert warmed.warm_up() > 0
    assert decoder_calls  # SAM's decoder ran, whatever the detector made of the synthetic frame
    got = warmed(image)
    np.testing.assert_array_equal(got.anomaly_map, expected.anomaly_map)
    assert [r.to_json() for r in got.regions] == [r.to_json() for r in expected.regions]


def test_a_streaming_memory_learns_nothing_from_the_warm_up(lite_engine_dir):
    pipeline = Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", stream_memory=400, image_threshold=1e9,
                             warm_up=True)
    assert pipeline.stream.seen == 0 and len(pipeline.stream.scores) == 0
    first = pipeline(read_image(BOTTLE))
    assert first.stream["serial"] == 1


def test_the_c_abi_warms_up_when_asked_and_gives_the_same_maps(lite_engine_dir, monkeypatch):
    from runtime.capi import CPipeline

    warmed = []  # ctypes loads libsaa.so into this interpreter: it calls this module's Pipeline
    real_warm_up = Pipeline.warm_up
    monkeypatch.setattr(Pipeline, "warm_up", lambda self, *a: warmed.append(self) or real_warm_up(self, *a))
    image = read_image(BOTTLE)
    opened = dict(dataset="mtd", category="mtd", stream_memory=400)
    with CPipeline.open(str(lite_engine_dir), **opened) as cold, \
            CPipeline.open(str(lite_engine_dir), warm_up=True, **opened) as warm:
        np.testing.assert_array_equal(warm(image).anomaly_map, cold(image).anomaly_map)
    assert len(warmed) == 1  # saa_open_ex with options.warm_up = 1, not saa_open
