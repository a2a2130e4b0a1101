"""Line-side decisions through the C ABI: thresholds, decisions and masks read back, memory and
calibration files opened (saa_open_ex), memory saved and reset."""
import numpy as np
import pytest

from runtime.capi import E_CONFIG, CapiError, CPipeline, abi
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
    for call in (pipe.set_thresholds, pipe.last_decision, pipe.last_mask, pipe.reset_memory):
        with pytest.raises(CapiError) as caught:  # the binding's own methods say so too, not "handle is NULL"
            call()
        assert caught.value.status == abi.E_CLOSED
    fresh = CPipeline.open(str(lite_engine_dir), dataset="mtd", category="mtd")
    with pytest.raises(CapiError, match="no successful call on this CPipeline yet"):
        fresh.last_mask()
    fresh.close()


# ---- saa_open_ex: calibration, memory, streaming memory, thresholds; saa_last_mask, saa_save_memory

@pytest.fixture(scope="module")
def good_parts(data_dir):
    import cv2

    return [cv2.imread(str(p)) for p in sorted((data_dir / "mtd-mini" / "MT_Free" / "Imgs").glob("*.jpg"))]


@pytest.fixture(scope="module")
def memory_file(lite_engine_dir, data_dir, tmp_path_factory):
    from runtime import memory

    path = tmp_path_factory.mktemp("memory") / "good.npz"
    assert memory.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd",
                        "--good", str(data_dir / "mtd-mini" / "MT_Free" / "Imgs"), "--out", str(path),
                        "--capacity", "500"]) == 0
    return path


def test_open_ex_matches_the_python_api_with_memory_and_thresholds(lite_engine_dir, data_dir, memory_file):
    image = tile(data_dir)
    python = Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", memory=memory_file, threads=1)
    expected = python(image)
    image_threshold, pixel_threshold = expected.pred_score / 2, float(np.quantile(expected.anomaly_map, 0.9))
    python.set_thresholds(image_threshold, pixel_threshold)
    expected = python(image)
    with CPipeline.open(str(lite_engine_dir), dataset="mtd", category="mtd", memory=memory_file, threads=1,
                        image_threshold=image_threshold, pixel_threshold=pixel_threshold) as pipe:
        got = pipe(image)
        np.testing.assert_allclose(got.anomaly_map, expected.anomaly_map, atol=1e-6)
        assert pipe.last_decision() == (pytest.approx(expected.pred_score, rel=1e-6), 1)
        mask = pipe.last_mask(image.shape[:2])
        np.testing.assert_array_equal(mask, expected.pred_mask)
        assert 0 < mask.mean() < 0.5
        np.testing.assert_array_equal(pipe.last_mask(), mask)  # the last map's size
        raw = np.zeros(image.shape[:2], np.uint8)  # 0 x 0: the image size, as in saa_infer
        assert pipe._library.saa_last_mask(pipe.handle, raw.ctypes.data, 0, 0) == 0
        np.testing.assert_array_equal(raw, mask)
        small = pipe(image, out_size=(50, 70))  # the mask follows the map size asked for
        np.testing.assert_array_equal(pipe.last_mask(), small.anomaly_map > pixel_threshold)
        assert pipe.last_mask().shape == (50, 70)
        with pytest.raises(CapiError, match=r"map size 60 x 70 differs from the last saa_infer's map, 50 x 70"):
            pipe.last_mask((60, 70))
        pipe.set_thresholds(image=image_threshold)  # no pixel threshold: no mask
        pipe(image)
        with pytest.raises(CapiError, match="no pixel threshold"):
            pipe.last_mask()
        with pytest.raises(CapiError, match="must be two positive integers"):
            pipe.last_mask((0, 5))


def test_open_ex_with_a_calibration(lite_engine_dir, data_dir, tmp_path):
    from runtime import calibrate

    path = tmp_path / "calibration.json"
    assert calibrate.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd",
                           "--good", str(data_dir / "mtd-mini" / "MT_Free" / "Imgs"), "--out", str(path)]) == 0
    with CPipeline.open(str(lite_engine_dir), dataset="mtd", category="mtd", calibration=path) as pipe:
        pipe(tile(data_dir))
        pipe.last_mask()  # the calibration set a pixel threshold
        assert pipe.last_decision()[1] in (0, 1)
    with pytest.raises(CapiError, match="calibration") as refused:  # made for another prompt config
        CPipeline.open(str(lite_engine_dir), dataset="mvtec", category="tile", calibration=path)
    assert refused.value.status == E_CONFIG


def test_stream_memory_learns_saves_reopens_and_resets(lite_engine_dir, good_parts, tmp_path):
    saved = tmp_path / "stream.npz"
    with CPipeline.open(str(lite_engine_dir), dataset="mtd", category="mtd", stream_memory=400,
                        image_threshold=1e9) as pipe:  # every part judged normal
        before = pipe(good_parts[0]).anomaly_map.copy()
        for _ in range(12):  # past the stream's warm-up (16 parts), then some learned
            for part in good_parts:
                pipe(part)
        pipe.save_memory(saved)
        learned = pipe(good_parts[0]).anomaly_map
        assert not np.allclose(learned, before)  # the stream learned from the good parts
        pipe.reset_memory()
        np.testing.assert_allclose(pipe(good_parts[0]).anomaly_map, before, atol=1e-6)
    with CPipeline.open(str(lite_engine_dir), dataset="mtd", category="mtd", memory=saved) as reopened:
        assert reopened(good_parts[0]).anomaly_map.shape == before.shape


def test_save_memory_without_one_and_bad_options(lite_engine_dir, tmp_path):
    import ctypes

    from runtime.capi import abi, load_library

    with CPipeline.open(str(lite_engine_dir), dataset="mtd", category="mtd") as pipe:
        with pytest.raises(CapiError, match="no memory to save"):
            pipe.save_memory(tmp_path / "none.npz")
    with CPipeline.open(str(lite_engine_dir), dataset="mtd", category="mtd", stream_memory=64) as pipe:
        with pytest.raises(CapiError, match="cannot write the memory") as caught:  # the path, not a configuration
            pipe.save_memory(tmp_path / "missing-folder" / "m.npz")
        assert caught.value.status == abi.E_INVALID_ARGUMENT
    library = load_library()
    options = abi.OpenOptions()  # not filled by saa_open_options_init: struct_size 0
    handle = ctypes.c_void_p(7)
    status = library.saa_open_ex(str(lite_engine_dir).encode(), b"mtd/mtd", ctypes.byref(options), ctypes.byref(handle))
    assert status == abi.E_INVALID_ARGUMENT and handle.value is None
    assert "struct_size is 0, expected 56 to 64" in library.saa_last_error(None).decode()
    options.struct_size = 72  # a newer saa.h's struct: this library cannot know its extra fields
    assert library.saa_open_ex(str(lite_engine_dir).encode(), b"mtd/mtd", ctypes.byref(options),
                               ctypes.byref(handle)) == abi.E_INVALID_ARGUMENT
    assert "newer saa.h" in library.saa_last_error(None).decode()
    library.saa_open_options_init(ctypes.byref(options))
    assert options.struct_size == ctypes.sizeof(abi.OpenOptions) == 64 and np.isnan(options.image_threshold)
    options.threads = 9
    library.saa_open_options_init_sized(ctypes.byref(options), 56)  # what the header's macro calls
    assert options.struct_size == 56 and options.threads == 0 and np.isnan(options.pixel_threshold)
    options.stream_memory = -3
    assert library.saa_open_ex(str(lite_engine_dir).encode(), b"mtd/mtd", ctypes.byref(options),
                               ctypes.byref(handle)) == abi.E_INVALID_ARGUMENT
    assert "options->stream_memory = -3 is negative" in library.saa_last_error(None).decode()
    options.stream_memory, options.memory = 0, str(tmp_path / "missing.npz").encode()
    assert library.saa_open_ex(str(lite_engine_dir).encode(), b"mtd/mtd", ctypes.byref(options),
                               ctypes.byref(handle)) == abi.E_CONFIG
    assert "missing.npz" in library.saa_last_error(None).decode()
    options.memory = str(tmp_path / "junk.npz").encode()
    (tmp_path / "junk.npz").write_bytes(b"not a memory")
    assert library.saa_open_ex(str(lite_engine_dir).encode(), b"mtd/mtd", ctypes.byref(options),
                               ctypes.byref(handle)) == abi.E_CONFIG, library.saa_last_error(None)
    options.memory = None
    assert library.saa_open_ex(str(lite_engine_dir).encode(), b"mtd/mtd", None, ctypes.byref(handle)) == abi.OK
    assert library.saa_close(handle) == abi.OK  # NULL options: the defaults
    assert library.saa_last_mask(None, None, 0, 0) == abi.E_INVALID_ARGUMENT
