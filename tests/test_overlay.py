"""runtime/outputs/overlay.py: the label says what a user must know before trusting the picture."""
import numpy as np
import pytest

from runtime.outputs import overlay as overlay_module
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


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_of_one_box_stack_instead_of_covering_each_other():
    shape, scale = (900, 900, 3), 0.6
    box = (266, 606, 312, 656)
    labels = [("defect 1.63", box), ("damage on bottle 1.64", box), ("crack 1.50", box)]
    origins = overlay_module.label_origins(shape, labels, scale)
    rects = [overlay_module.text_rect(shape, text, origin, scale) for (text, _), origin in zip(labels, origins)]
    assert all(not _overlap(a, b) for i, a in enumerate(rects) for b in rects[i + 1:])
    assert all(rect[3] <= box[1] for rect in rects)  # all above the box: there is room


def test_a_label_goes_below_its_box_where_the_title_takes_the_room_above():
    shape, scale = (900, 900, 3), 0.6
    title = overlay_module.text_rect(shape, "RANDOM WEIGHTS, max 1.335", (4, 30), scale)
    box = (118, 34, 164, 82)
    (origin,) = overlay_module.label_origins(shape, [("defect on bottle 1.56", box)], scale, [title])
    rect = overlay_module.text_rect(shape, "defect on bottle 1.56", origin, scale)
    assert not _overlap(rect, title) and rect[1] >= box[3] and rect[3] <= shape[0]


def test_regions_without_a_phrase_are_labelled_with_their_prompt(monkeypatch):
    from runtime.stages.regions import Region

    written = []
    monkeypatch.setattr(overlay_module, "put_text", lambda picture, text, origin, scale: written.append(text))
    values = np.zeros((200, 200), np.float32)
    region = Region(box=(50, 60, 90, 100), detector_score=0.5, phrase="", prompt_index=0, prompt="black hole",
                    box_area=0.04, score=1.25, in_top_k=True)
    overlay_module.overlay(np.zeros((200, 200, 3), np.uint8), values, AnomalyResult(values, values, [region], [], False))
    assert written == ["black hole 1.25", "max 0.000"]
