"""runtime/overlay.py: the label says what a user must know before trusting the picture."""
import numpy as np
import pytest

from runtime import overlay as overlay_module
from runtime.pipeline import AnomalyResult


@pytest.mark.parametrize("saliency_only, random_weights, label", [
    (True, False, "saliency only (lite)"),
    (False, False, "max 0.500"),
    (False, True, "RANDOM WEIGHTS, max 0.500"),
])
def test_the_label_names_lite_maps_and_random_weights(monkeypatch, saliency_only, random_weights, label):
    written = []
    monkeypatch.setattr(overlay_module, "put_text", lambda picture, text, origin, scale: written.append(text))
    values = np.full((40, 60), 0.5, np.float32)
    result = AnomalyResult(values, values, [], [], saliency_only, random_weights=random_weights)
    picture = overlay_module.overlay(np.zeros((40, 60, 3), np.uint8), values, result)
    assert picture.shape == (40, 60, 3) and written == [label]
