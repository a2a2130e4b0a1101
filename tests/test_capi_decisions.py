"""Line-side decisions through the C ABI: thresholds set, decisions read back, memory reset."""
import numpy as np
import pytest

from runtime.capi import CapiError, CPipeline
from runtime.pipeline import Pipeline


def tile(data_dir):
    import cv2

    return cv2.imread(str(next((data_dir / "mtd-mini" / "MT_Crack" / "Imgs").glob("*.jpg"))))


def test_thresholds_and_decisions_match_the_python_api(lite_engine_dir, data_dir):
    image = tile(data_dir)
    python = Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd")
    with CPipeline.open(str(lite_engine_dir), dataset="mtd", category="mtd") as pipe:
        with pytest.raises(CapiError, match="no successful saa_infer"):
            pipe.last_decision()
        pipe(image)
        score, label = pipe.last_decision()
        expected = python(image)
        assert score == pytest.approx(expected.pred_score, rel=1e-6) and label is None
        pipe.set_thresholds(image=score / 2)
        pipe(image)
        assert pipe.last_decision()[1] == 1  # NG: the score is above the threshold
        pipe.set_thresholds(image=score * 2, pixel=score / 2)
        pipe(image)
        assert pipe.last_decision()[1] == 0
        pipe.reset_memory()  # no memory: a no-op that succeeds
    python.set_thresholds(image=score / 2)
    assert python(image).pred_label == 1


def test_closed_handle_is_refused(lite_engine_dir):
    pipe = CPipeline.open(str(lite_engine_dir), dataset="mtd", category="mtd")
    library, handle = pipe._library, pipe._handle
    pipe.close()
    assert library.saa_reset_memory(handle) != 0
    assert b"closed" in library.saa_last_error(handle)
