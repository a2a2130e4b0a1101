"""C ABI through ctypes, in this Python process: every failure gives its status and a message
naming the problem (and the process survives), frames reach the pipeline as the Python API
sees them, threads give single-threaded results, saa.h agrees with the Python constants."""
from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest_engines import lite_engine_dir  # noqa: F401  (session fixture)
from runtime import capi
from runtime.capi import _host, abi, build
from runtime.capi import CapiError, CPipeline
from runtime.pipeline import Pipeline
from runtime.stages.regions import Region

DATA = Path(__file__).parent / "data"
IMAGE = DATA / "mtd_break_exp6_num_348888.jpg"  # real MTD image, 488x380 gray
HEADER = Path(capi.__file__).parent / "saa.h"


@pytest.fixture(scope="module")
def library() -> ctypes.CDLL:
    """libsaa.so, rebuilt in place first if it is older than its sources (pip install -e . builds it)."""
    if build.is_stale():
        build.build_library()
    return capi.load_library()


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(IMAGE), cv2.IMREAD_UNCHANGED), cv2.COLOR_GRAY2BGR)


@pytest.fixture(scope="module")
def pipe(library, lite_engine_dir) -> CPipeline:  # noqa: F811
    with CPipeline.open(lite_engine_dir, dataset="mtd", category="mtd") as opened:
        yield opened


@pytest.fixture(scope="module")
def python_pipe(lite_engine_dir) -> Pipeline:  # noqa: F811
    return Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd")


# ---- saa.h and the Python side agree ----------------------------------------------------------

def test_header_constants_match_python():
    text = HEADER.read_text()
    codes = dict(re.findall(r"\b(SAA_(?:OK|E_\w+))\s*=\s*(-?\d+)", text))
    assert codes, "no status codes found in saa.h"
    for name, value in codes.items():
        assert getattr(abi, name.removeprefix("SAA_")) == int(value), name
    assert int(re.search(r"#define SAA_ABI_VERSION (\d+)", text).group(1)) == abi.ABI_VERSION
    assert int(re.search(r"#define SAA_PHRASE_CAPACITY (\d+)", text).group(1)) == abi.PHRASE_CAPACITY


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_region_struct_layout_matches_dtype(tmp_path):
    """offsetof/sizeof as the C compiler lays saa_region out == REGION_DTYPE's offsets."""
    source = tmp_path / "layout.c"
    source.write_text('#include <stddef.h>\n#include <stdio.h>\n#include "saa.h"\nint main(void) {\n'
                      'printf("{\\"size\\": %zu, \\"box\\": %zu, \\"score\\": %zu, \\"mask_area\\": %zu, '
                      '\\"prompt_index\\": %zu, \\"in_top_k\\": %zu, \\"phrase\\": %zu}\\n", sizeof(saa_region), '
                      'offsetof(saa_region, x0), offsetof(saa_region, score), offsetof(saa_region, mask_area), '
                      'offsetof(saa_region, prompt_index), offsetof(saa_region, in_top_k), '
                      'offsetof(saa_region, phrase));\nreturn 0;\n}\n')
    subprocess.run(["cc", f"-I{HEADER.parent}", str(source), "-o", str(tmp_path / "layout")], check=True)
    layout = json.loads(subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True).stdout)
    assert layout.pop("size") == abi.REGION_DTYPE.itemsize
    assert layout == {name: abi.REGION_DTYPE.fields[name][1] for name in layout}


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_open_options_layout_matches_ctypes(tmp_path):
    """offsetof/sizeof of saa_open_options as the C compiler lays it out == abi.OpenOptions."""
    fields = [name for name, _ in abi.OpenOptions._fields_]
    source = tmp_path / "options.c"
    prints = " ".join(f'printf("{name} %zu\\n", offsetof(saa_open_options, {name}));' for name in fields)
    source.write_text('#include <stddef.h>\n#include <stdio.h>\n#include "saa.h"\nint main(void) {\n'
                      f'printf("size %zu\\n", sizeof(saa_open_options)); {prints}\nreturn 0;\n}}\n')
    subprocess.run(["cc", f"-I{HEADER.parent}", str(source), "-o", str(tmp_path / "options")], check=True)
    out = subprocess.run([str(tmp_path / "options")], capture_output=True, text=True, check=True).stdout
    layout = {name: int(value) for name, value in (line.split() for line in out.splitlines())}
    assert layout.pop("size") == ctypes.sizeof(abi.OpenOptions)
    assert layout == {name: getattr(abi.OpenOptions, name).offset for name in fields}


@pytest.mark.skipif(shutil.which("nm") is None, reason="no nm (binutils)")
def test_library_leaves_python_to_the_host(library):
    """No undefined Py* symbol and no libpython dependency: in a Python process the running
    interpreter's symbols are used, so no second interpreter copy is ever loaded."""
    path = str(capi.library_path())
    undefined = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True).stdout
    assert not re.search(r"\bPy", undefined)
    if shutil.which("readelf"):
        needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
        assert "NEEDED" in needed and "libpython" not in needed
    exported = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True).stdout
    assert set(re.findall(r"\b(saa_\w+)", exported)) == {"saa_version", "saa_abi_version", "saa_open", "saa_infer",
                                                        "saa_last_error", "saa_close", "saa_set_thresholds",
                                                        "saa_last_decision", "saa_last_exact", "saa_reset_memory", "saa_last_mask",
                                                        "saa_save_memory", "saa_open_options_init", "saa_open_options_init_sized",
                                                        "saa_open_ex"}


def test_version(library):
    assert capi.abi_version() == abi.ABI_VERSION
    assert f"C ABI {abi.ABI_VERSION}" in capi.version() and "Python 3." in capi.version()


def test_ctypes_host_reuses_the_running_interpreter(pipe, frame, monkeypatch):
    """The library calls the pipeline objects of this very interpreter (a patched method sees the
    call, with this frame's pixels in place), and maps no further libpython into the process."""
    def mapped_libpython() -> set[str]:
        return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libpython" in line}

    before, seen = mapped_libpython(), []
    original = Pipeline.__call__

    def spy(self, image, out_size=None):
        seen.append(image.__array_interface__["data"][0])
        return original(self, image, out_size)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    crop = np.ascontiguousarray(frame[:64, :64])
    pipe(crop)
    assert seen == [crop.ctypes.data]  # zero copy: the pipeline read the caller's buffer
    assert mapped_libpython() == before


# ---- failures: status code + message naming the problem; the process survives ---------------

def raw_infer(library, handle, pixels, height, width, stride, channels, map_out, map_height, map_width,
              regions, max_regions, count):
    return library.saa_infer(handle, pixels, height, width, stride, channels, map_out, map_height, map_width,
                             regions, max_regions, count)


def test_infer_argument_errors(library, pipe, frame):
    height, width = 40, 50
    pixels = np.ascontiguousarray(frame[:height, :width])
    values = np.zeros((height, width), np.float32)
    regions = np.zeros(4, abi.REGION_DTYPE)
    count = ctypes.c_int(7)
    good = dict(handle=pipe.handle, pixels=pixels.ctypes.data, height=height, width=width, stride=width * 3,
                channels=3, map_out=values.ctypes.data, map_height=height, map_width=width,
                regions=regions.ctypes.data, max_regions=4, count=ctypes.byref(count))
    cases = [
        (dict(pixels=None), abi.E_INVALID_ARGUMENT, "pixels is NULL"),
        (dict(map_out=None), abi.E_INVALID_ARGUMENT, "map_out is NULL"),
        (dict(count=None), abi.E_INVALID_ARGUMENT, "n_regions is NULL"),
        (dict(regions=None), abi.E_INVALID_ARGUMENT, "regions_out is NULL but max_regions is 4"),
        (dict(height=0), abi.E_INVALID_ARGUMENT, "image size 0 x 50"),
        (dict(width=-5), abi.E_INVALID_ARGUMENT, "image size 40 x -5"),
        (dict(channels=2), abi.E_INVALID_ARGUMENT, "channels = 2"),
        (dict(stride=width * 3 - 1), abi.E_INVALID_ARGUMENT, "stride_bytes 149 is smaller than a row"),
        (dict(stride=-150), abi.E_INVALID_ARGUMENT, "stride_bytes -150"),
        (dict(map_height=-1), abi.E_INVALID_ARGUMENT, "map size -1 x 50"),
        (dict(map_width=0), abi.E_INVALID_ARGUMENT, "map size 40 x 0"),
        (dict(max_regions=-1), abi.E_INVALID_ARGUMENT, "max_regions = -1"),
        (dict(height=1, width=1, stride=3), abi.E_IMAGE, "smaller than 2x2"),
        (dict(handle=None), abi.E_BAD_HANDLE, "handle is NULL"),
        (dict(handle=regions.ctypes.data), abi.E_BAD_HANDLE, "not a handle returned by saa_open"),
    ]
    for change, status, words in cases:
        count.value = 7
        assert raw_infer(library, **{**good, **change}) == status, change
        assert words in capi.last_error(None), change
        if change.get("handle", good["handle"]) == good["handle"]:
            assert words in capi.last_error(pipe.handle), change  # recorded on the handle too
            assert count.value == 0 or change.get("count", 1) is None
    # Still serviceable after all of that; 0 x 0 means the image size.
    assert raw_infer(library, **{**good, "map_height": 0, "map_width": 0}) == abi.OK
    assert values.max() > 0


def test_open_errors(library, lite_engine_dir, tmp_path):  # noqa: F811
    handle = ctypes.c_void_p(12345)
    engines = str(lite_engine_dir).encode()
    bad_yaml = tmp_path / "broken.yaml"
    bad_yaml.write_text("object_prompt: [unclosed\n")
    unknown_key = tmp_path / "unknown.json"
    unknown_key.write_text(json.dumps({"object_prompt": "tile", "defect_prompts": ["crack."], "colour": "red"}))
    cases = [
        ((engines, b"mtd/mtd", b"cpu", None), abi.E_INVALID_ARGUMENT, "handle is NULL"),
        ((None, b"mtd/mtd", b"cpu", ctypes.byref(handle)), abi.E_INVALID_ARGUMENT, "engine_dir is NULL"),
        ((engines, None, b"cpu", ctypes.byref(handle)), abi.E_INVALID_ARGUMENT, "config is NULL"),
        ((str(tmp_path / "none").encode(), b"mtd/mtd", b"cpu", ctypes.byref(handle)), abi.E_ENGINES,
         "does not exist"),
        ((str(tmp_path).encode(), b"mtd/mtd", b"cpu", ctypes.byref(handle)), abi.E_ENGINES, "manifest.json"),
        ((engines, b"mtd/bottle", b"cpu", ctypes.byref(handle)), abi.E_CONFIG, "no category 'bottle'"),
        ((engines, b"cars/sedan", b"cpu", ctypes.byref(handle)), abi.E_CONFIG, "unknown dataset 'cars'"),
        ((engines, b"bottle", b"cpu", ctypes.byref(handle)), abi.E_CONFIG, "neither a prompt file"),
        ((engines, str(tmp_path / "missing.yaml").encode(), b"cpu", ctypes.byref(handle)), abi.E_CONFIG,
         "config file not found"),
        ((engines, str(bad_yaml).encode(), b"cpu", ctypes.byref(handle)), abi.E_CONFIG, "cannot parse"),
        ((engines, str(unknown_key).encode(), b"cpu", ctypes.byref(handle)), abi.E_CONFIG, "unknown keys ['colour']"),
        ((engines, b"mtd/mtd", b"tpu", ctypes.byref(handle)), abi.E_INVALID_ARGUMENT, "device 'tpu'"),
    ]
    for arguments, status, words in cases:
        handle.value = 12345
        assert library.saa_open(*arguments) == status, words
        assert words in capi.last_error(None), (words, capi.last_error(None))
        assert arguments[3] is None or handle.value is None  # *handle is NULL after a failure


def test_closed_and_foreign_handles(library, lite_engine_dir, frame):  # noqa: F811
    pipe = CPipeline.open(lite_engine_dir, dataset="mtd", category="mtd")
    handle = pipe.handle
    pipe.close()
    values = np.zeros((8, 8), np.float32)
    count = ctypes.c_int()
    pixels = np.ascontiguousarray(frame[:8, :8])
    status = library.saa_infer(handle, pixels.ctypes.data, 8, 8, 24, 3, values.ctypes.data, 8, 8, None, 0,
                               ctypes.byref(count))
    assert status == abi.E_CLOSED and "closed by saa_close" in capi.last_error(handle)
    assert library.saa_close(handle) == abi.E_CLOSED and "already closed" in capi.last_error(None)
    assert library.saa_close(None) == abi.E_BAD_HANDLE and "handle is NULL" in capi.last_error(None)
    foreign = ctypes.create_string_buffer(256)  # memory that was never a handle
    assert library.saa_close(ctypes.addressof(foreign)) == abi.E_BAD_HANDLE
    assert "not a handle returned by saa_open" in capi.last_error(ctypes.addressof(foreign))
    with pytest.raises(CapiError) as caught:
        pipe(frame)
    assert caught.value.status == abi.E_CLOSED


def test_binding_errors(pipe, frame):
    cases = [
        (lambda: pipe(frame, map_out=np.zeros((10, 10), np.float32)), abi.E_INVALID_ARGUMENT,
         "map_out has shape (10, 10) but the image size is 380x488"),
        (lambda: pipe(frame, out_size=(20, 30), map_out=np.zeros((30, 20), np.float32)), abi.E_INVALID_ARGUMENT,
         "but out_size is 20x30"),
        (lambda: pipe(frame, map_out=np.zeros(frame.shape[:2], np.float64)), abi.E_INVALID_ARGUMENT, "float32"),
        (lambda: pipe(frame, out_size=0), abi.E_INVALID_ARGUMENT, "out_size 0"),
        (lambda: pipe(frame, max_regions=-2), abi.E_INVALID_ARGUMENT, "max_regions = -2"),
        (lambda: pipe(frame[:, :, :2]), abi.E_INVALID_ARGUMENT, "image shape (380, 488, 2)"),
        (lambda: pipe(np.zeros((0, 5, 3), np.uint8)), abi.E_INVALID_ARGUMENT, "image size 0 x 5"),
        (lambda: pipe(np.full((4, 4), np.nan, np.float32)), abi.E_IMAGE, "NaN"),
        (lambda: pipe([[1, 2], [3, 4]]), abi.E_INVALID_ARGUMENT, "numpy array"),
        (lambda: CPipeline.open("x", dataset="mtd", category="mtd", config="y.yaml"), abi.E_CONFIG, "not both"),
        (lambda: pipe(frame, max_regions=2**31), abi.E_INVALID_ARGUMENT, "max_regions = 2147483648"),
        (lambda: pipe(frame, out_size=(20_000, 20_000), max_regions=0), abi.E_INVALID_ARGUMENT,
         "map size 20000 x 20000 is over 100 megapixels"),
        (lambda: pipe.set_thresholds(image=float("inf")), abi.E_INVALID_ARGUMENT, "finite number"),
    ]
    for call, status, words in cases:
        with pytest.raises(CapiError) as caught:
            call()
        assert caught.value.status == status and words in str(caught.value), (words, str(caught.value))
    # numpy integers are integers (sizes often come out of array shapes)
    assert pipe(frame, out_size=np.int64(12), max_regions=np.int64(2)).anomaly_map.shape == (12, 12)


# ---- frames and results: the same as the Python API --------------------------------------------

def test_layouts_match_python_api(pipe, python_pipe, frame):
    """Gray, BGR, BGRA and a padded-row crop, each equal to the Python API on the same array; packed
    uint8 frames are handed over without a copy."""
    crop = frame[100:260, 40:300]
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    bgra = cv2.cvtColor(crop, cv2.COLOR_BGR2BGRA)
    padded = frame[100:260, 40:300]  # rows 488*3 bytes apart: the camera-buffer case
    assert capi.frame_arguments(padded)[0] is padded and capi.frame_arguments(padded)[3] == 488 * 3
    contiguous = np.ascontiguousarray(crop)
    assert capi.frame_arguments(contiguous)[0] is contiguous
    for image in (gray, contiguous, bgra, padded, crop[:, ::-1]):
        expected = python_pipe(image).anomaly_map
        np.testing.assert_array_equal(pipe(image).anomaly_map, expected)
    out = np.empty((50, 70), np.float32)
    result = pipe(gray, out_size=(50, 70), map_out=out)
    assert result.anomaly_map is out
    np.testing.assert_allclose(out, python_pipe(gray, out_size=(50, 70)).anomaly_map, rtol=0, atol=1e-6)
    assert pipe(gray, out_size=33).anomaly_map.shape == (33, 33)


def test_prompt_file_config(library, lite_engine_dir, tmp_path, frame):  # noqa: F811
    prompts = tmp_path / "tile.json"
    prompts.write_text(json.dumps({"name": "tile", "object_prompt": "tile", "defect_prompts": ["crack. hole."]}))
    with CPipeline.open(lite_engine_dir, config=prompts) as pipe:
        assert pipe(frame[:64, :64]).anomaly_map.shape == (64, 64)
    assert _host.parse_config(str(prompts)) == {"config": prompts}


def test_parse_config_rule(tmp_path):
    plain = tmp_path / "prompts"  # an existing file counts whatever its name
    plain.write_text("{}")
    assert _host.parse_config(str(plain)) == {"config": plain}
    assert _host.parse_config("mvtec/bottle") == {"dataset": "mvtec", "category": "bottle"}
    assert _host.parse_config("cfg/part.YAML") == {"config": Path("cfg/part.YAML")}
    for text in ("bottle", "a/b/c", "/bottle", "mvtec/"):
        with pytest.raises(Exception, match="neither a prompt file"):
            _host.parse_config(text)


def region(score: float, top: bool, phrase: str = "crack", index: int = 0) -> Region:
    return Region(box=(1.0, 2.0, 30.5, 40.25), detector_score=0.5, phrase=phrase, prompt_index=index, prompt="crack.",
                  box_area=0.1, mask_area=123, score=score, in_top_k=top)


def test_region_order_and_phrase_cut():
    """saa.h order (fused first, each by score descending), truncation to max_regions, UTF-8-safe phrases."""
    regions = [region(0.9, False, "a"), region(0.2, True, "b"), region(0.7, True, "c"), region(0.95, False, "d")]
    out = np.zeros(3, abi.REGION_DTYPE)
    assert _host.fill_regions(regions, out) == 3
    assert [bytes(p).decode() for p in out["phrase"]] == ["c", "b", "d"]
    assert out["in_top_k"].tolist() == [1, 1, 0]
    np.testing.assert_array_equal(out["box"][0], np.float32([1.0, 2.0, 30.5, 40.25]))
    assert out["mask_area"].tolist() == [123] * 3
    long = "é" * 40  # 80 bytes: cut at 62 bytes, a whole number of characters, NUL left
    cut = _host.phrase_bytes(long)
    assert len(cut) <= abi.PHRASE_CAPACITY - 1 and cut.decode("utf-8") == "é" * 31


# ---- threads ------------------------------------------------------------------------------------

def test_threads_match_single_threaded(library, lite_engine_dir, frame):  # noqa: F811
    """4 threads on one handle, then 4 threads over 2 handles: every map equals its single-threaded one."""
    crops = [frame[0:200, 0:240], cv2.cvtColor(frame[100:300, 200:480], cv2.COLOR_BGR2GRAY),
             cv2.cvtColor(frame[150:380, 50:250], cv2.COLOR_BGR2BGRA), frame[60:330, 100:488]]
    with CPipeline.open(lite_engine_dir, dataset="mtd", category="mtd") as first, \
            CPipeline.open(lite_engine_dir, dataset="mtd", category="mtd") as second:
        expected = [first(image).anomaly_map for image in crops]

        def run(handles: list[CPipeline]) -> list[np.ndarray]:
            results: list[np.ndarray | BaseException] = [None] * len(crops)
            start = threading.Barrier(len(crops))

            def work(index: int) -> None:
                start.wait()
                try:
                    results[index] = handles[index % len(handles)](crops[index]).anomaly_map
                except BaseException as err:  # noqa: BLE001 - reported below
                    results[index] = err

            threads = [threading.Thread(target=work, args=(i,)) for i in range(len(crops))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return results

        for handles in ([first], [first, second]):
            for got, want in zip(run(handles), expected):
                assert not isinstance(got, BaseException), got
                np.testing.assert_array_equal(got, want)


PYDLL_SCRIPT = r"""
import ctypes, sys, threading
import numpy as np
from runtime import capi
library = ctypes.PyDLL(str(capi.library_path()))  # keeps the GIL held during each call
capi._declare(library)
handle = ctypes.c_void_p()
assert library.saa_open(sys.argv[1].encode(), b"mtd/mtd", b"cpu", ctypes.byref(handle)) == 0
frame = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
maps = [np.zeros((96, 128), np.float32) for _ in range(4)]
def work(i):
    count = ctypes.c_int()
    assert library.saa_infer(handle, frame.ctypes.data, 96, 128, 384, 3, maps[i].ctypes.data, 96, 128, None, 0,
                             ctypes.byref(count)) == 0
threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
assert all(np.array_equal(m, maps[0]) and m.max() > 0 for m in maps)
print("ok")
"""


FIRST_OPEN_SCRIPT = r"""
import ctypes, sys, threading, time
from runtime import capi
path = str(capi.library_path())
released, holding = ctypes.CDLL(path), ctypes.PyDLL(path)  # PyDLL keeps the GIL held during each call
capi._declare(released)
capi._declare(holding)
statuses = []
def open_with(library):
    handle = ctypes.c_void_p()
    statuses.append(library.saa_open(sys.argv[1].encode(), b"mtd/mtd", b"cpu", ctypes.byref(handle)))
first = threading.Thread(target=open_with, args=(released,))
first.start()
time.sleep(0.05)  # the thread is inside the library's one-time start-up (importing the pipeline)
open_with(holding)
first.join()
print(statuses)
"""


def test_first_opens_from_a_gil_holding_caller_and_a_thread_do_not_deadlock(library, lite_engine_dir):  # noqa: F811
    """The one-time start-up needs the GIL; a PyDLL caller waiting for it must not hold it."""
    done = subprocess.run([sys.executable, "-c", FIRST_OPEN_SCRIPT, str(lite_engine_dir)], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0 and done.stdout.strip() == "[0, 0]", done.stderr


def test_gil_holding_callers_do_not_deadlock(library, lite_engine_dir):  # noqa: F811
    """Through ctypes.PyDLL the caller holds the GIL: a thread waiting for a busy handle must
    let the GIL go, or the thread inside the pipeline could never finish."""
    done = subprocess.run([sys.executable, "-c", PYDLL_SCRIPT, str(lite_engine_dir)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
