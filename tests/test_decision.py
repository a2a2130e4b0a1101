"""Image score, OK/NG label and defect mask: plain runtime thresholds, in the pipeline's result."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from runtime.lineside.decision import Thresholds, decide, image_score
from runtime.errors import ConfigError
from runtime.pipeline import Pipeline


def test_decide_uses_strict_thresholds():
    values = np.array([[0.1, 0.5], [0.2, 0.3]], np.float32)
    assert image_score(values) == pytest.approx(0.5)
    decision = decide(values, Thresholds(image=0.5, pixel=0.2))
    assert decision.pred_score == pytest.approx(0.5) and decision.pred_label == 0  # not above: OK
    np.testing.assert_array_equal(decision.pred_mask, [[False, True], [False, True]])
    assert decide(values, Thresholds(image=0.49)).pred_label == 1
    none = decide(values, Thresholds())
    assert none.pred_label is None and none.pred_mask is None
    assert decide(values, Thresholds(image=0.4), score=0.3).pred_label == 0  # a given score wins over the map


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.3", True])
def test_thresholds_must_be_finite_numbers(bad):
    with pytest.raises(ConfigError, match="finite number"):
        Thresholds(image=bad).checked()
    with pytest.raises(ConfigError, match="pixel threshold"):
        Thresholds(pixel=bad).checked()


def test_empty_map_has_no_score():
    with pytest.raises(ValueError, match="empty"):
        image_score(np.zeros((0, 3), np.float32))


def test_pipeline_reports_decisions(lite_engine_dir, data_dir):
    image = cv2.imread(str(next((data_dir / "mtd-mini" / "MT_Crack" / "Imgs").glob("*.jpg"))))
    pipeline = Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd")
    plain = pipeline(image)
    assert plain.pred_score == pytest.approx(float(plain.anomaly_map.max()))
    assert plain.pred_label is None and plain.pred_mask is None
    json_view = plain.regions_json()
    assert json_view["pred_score"] == plain.pred_score and json_view["pred_label"] is None

    low, high = float(np.quantile(plain.anomaly_map, 0.5)), plain.pred_score + 1.0
    pipeline.set_thresholds(image=low, pixel=low)
    judged = pipeline(image)
    assert judged.pred_label == 1
    np.testing.assert_array_equal(judged.pred_mask, plain.anomaly_map > low)
    assert pipeline(image, out_size=64).pred_mask.shape == (64, 64)  # the mask follows the map's size
    assert pipeline(image, out_size=64).pred_score == plain.pred_score  # the score does not
    pipeline.set_thresholds(image=high)
    assert pipeline(image).pred_label == 0 and pipeline(image).pred_mask is None
    with pytest.raises(ConfigError):
        pipeline.set_thresholds(image=float("nan"))
    opened = Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", image_threshold=high, pixel_threshold=low)
    assert opened.thresholds == Thresholds(high, low)
