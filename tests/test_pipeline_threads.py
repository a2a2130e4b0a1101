"""One Pipeline called from several threads gives each image its own result.

SAM keeps the image embedding between set_image() and the box prompts, so two images in
flight at once through the same segmenter would mix. The test forces exactly that interleave
(each thread parks right after its set_image until the other has called it too); the pipeline's
lock must keep the second image out until the first is done (the parked thread then times out
alone and goes on)."""
from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from runtime.image_io import read_image
from runtime.pipeline import Pipeline

BOTTLE = Path(__file__).resolve().parent / "data" / "bottle_demo.png"


def test_concurrent_calls_do_not_share_sam_state(full_tiny_engine_dir):
    pipeline = Pipeline.open(full_tiny_engine_dir, dataset="mvtec", category="bottle", threads=1)
    first = read_image(BOTTLE)
    second = np.ascontiguousarray(cv2.rotate(first, cv2.ROTATE_90_CLOCKWISE)[::-1])
    expected = [pipeline(first).anomaly_map, pipeline(second).anomaly_map]
    assert not np.array_equal(expected[0], expected[1])

    both_embedded = threading.Barrier(2, timeout=2.0)
    set_image = pipeline.segmenter.set_image

    def set_image_then_wait(image):
        set_image(image)
        try:
            both_embedded.wait()  # without the lock, the other thread now replaces this embedding
        except threading.BrokenBarrierError:
            pass

    pipeline.segmenter.set_image = set_image_then_wait
    got: list = [None, None]
    errors: list = []

    def call(index, image):
        try:
            got[index] = pipeline(image).anomaly_map
        except Exception as err:  # surfaced below, not lost in the thread
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i, image)) for i, image in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for ours, theirs in zip(got, expected):
        np.testing.assert_array_equal(ours, theirs)
