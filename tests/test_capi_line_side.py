"""The C ABI from a plain C/C++ program (the library starts its own interpreter): the example
builds with g++ and the flags `python -m runtime.capi` prints, and its .npy equals the Python
API's and the CLI's map on real images as PPM/PGM; 4 C threads match single-threaded calls;
the soak runs."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest_engines import full_tiny_engine_dir, lite_engine_dir  # noqa: F401  (session fixtures)
from runtime.capi import _host, build
from runtime.pipeline import Pipeline

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
COLOR_SOURCE = DATA / "mtd_break_exp6_num_348888.jpg"  # real MTD images (gray JPEGs)
GRAY_SOURCE = DATA / "mtd-mini" / "MT_Blowhole" / "Imgs" / "exp1_num_40410.jpg"
MAP_TOLERANCE = 1e-5  # same process layout, same engines: the maps agree to float rounding or better

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or shutil.which("cc") is None,
                                reason="needs g++ and cc")


def capi_flags() -> list[str]:
    """What the README's build line expands $(python -m runtime.capi --cflags --libs) to."""
    done = subprocess.run([sys.executable, "-m", "runtime.capi", "--cflags", "--libs"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


@pytest.fixture(scope="module")
def flags() -> list[str]:
    if build.is_stale():  # `pip install -e .` builds it; rebuild in place when the sources are newer
        build.build_library()
    return capi_flags()


FLAGS_EXPANSION = "$(python -m runtime.capi --cflags --libs)"


def documented_build_line() -> str:
    """The g++ line of docs/capi.md, which the tests run as written (plus warnings as errors)."""
    lines = [line for line in (REPO / "docs" / "capi.md").read_text().splitlines() if line.startswith("g++ ")]
    assert len(lines) == 1 and FLAGS_EXPANSION in lines[0] and lines[0].endswith("-o line_side")
    return lines[0]


@pytest.fixture(scope="module")
def line_side(flags, tmp_path_factory) -> Path:
    """examples/line_side.cpp built once, with the documented command line."""
    binary = tmp_path_factory.mktemp("line_side") / "line_side"
    words = shlex.split(documented_build_line().replace(FLAGS_EXPANSION, shlex.join(flags)))
    command = [*words[:-1], str(binary), "-Wall", "-Wextra", "-Werror"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return binary


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Real MTD images as binary PPM (colour, BGR on disk order handled by cv2) and PGM (gray)."""
    folder = tmp_path_factory.mktemp("pnm")
    color = cv2.cvtColor(cv2.imread(str(COLOR_SOURCE), cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2BGR)
    color[:, :, 0] = cv2.equalizeHist(color[:, :, 0])  # make the channels differ: a swapped R/B would show
    paths = {"ppm": folder / "break.ppm", "pgm": folder / "blowhole.pgm"}
    assert cv2.imwrite(str(paths["ppm"]), color)
    assert cv2.imwrite(str(paths["pgm"]), cv2.imread(str(GRAY_SOURCE), cv2.IMREAD_GRAYSCALE))
    return paths


def run_line_side(binary: Path, engine_dir: Path, image: Path, out: Path, *config: str,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    config = config or ("--dataset", "mtd", "--category", "mtd")
    return subprocess.run([str(binary), str(engine_dir), *config, str(image), str(out)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd="/", timeout=600)


def run_cli(engine_dir: Path, inputs: list[Path], out: Path, *config: str) -> None:
    config = config or ("--dataset", "mtd", "--category", "mtd")
    subprocess.run([sys.executable, "-m", "runtime.infer", "--engine-dir", str(engine_dir), *config,
                    *map(str, inputs), "--out", str(out), "--no-progress"], cwd=REPO, check=True,
                   capture_output=True, text=True, timeout=600)


def check_against_python(binary: Path, engine_dir: Path, images: dict[str, Path], tmp_path: Path,
                         prompts: Path | None = None) -> None:
    """The example's .npy and regions == the Python API's == the CLI's, for each image."""
    config = ("--config", str(prompts)) if prompts else ("--dataset", "mtd", "--category", "mtd")
    python = Pipeline.open(engine_dir, **({"config": prompts} if prompts else {"dataset": "mtd", "category": "mtd"}))
    run_cli(engine_dir, list(images.values()), tmp_path / "cli", *config)
    for kind, image in images.items():
        out = tmp_path / f"{kind}.npy"
        done = run_line_side(binary, engine_dir, image, out, *config, env={"SAA_VERBOSE": "1"})
        assert done.returncode == 0, done.stderr
        assert "saa: starting Python" in done.stderr and "site-packages" in done.stderr  # it says what it uses
        values = np.load(out)
        from runtime.image_io import read_image  # the Python API reads the PPM/PGM itself

        expected = python(read_image(image))
        assert values.dtype == np.float32 and values.shape == expected.anomaly_map.shape
        np.testing.assert_allclose(values, expected.anomaly_map, rtol=0, atol=MAP_TOLERANCE)
        cli = np.load(tmp_path / "cli" / f"{image.stem}_map.npy")
        np.testing.assert_allclose(values, cli, rtol=0, atol=MAP_TOLERANCE)
        printed = [json.loads(line) for line in done.stdout.splitlines()]
        wanted = _host.abi_order(expected.regions)[:256]
        assert len(printed) == len(wanted) and (expected.saliency_only or printed), "full engines: no regions"
        for got, region in zip(printed, wanted):
            np.testing.assert_allclose(got["box"], region.box, rtol=1e-6, atol=1e-3)
            assert got["score"] == pytest.approx(region.score, rel=1e-6)
            assert (got["mask_area"], got["prompt_index"], got["in_top_k"]) == (
                region.mask_area, region.prompt_index, region.in_top_k)
            assert got["phrase"] == _host.phrase_bytes(region.phrase).decode()


def test_line_side_lite_matches_python_api_and_cli(line_side, lite_engine_dir, images, tmp_path):  # noqa: F811
    check_against_python(line_side, lite_engine_dir, images, tmp_path)


def test_line_side_full_tiny_matches_python_api_and_cli(line_side, full_tiny_engine_dir, images,  # noqa: F811
                                                        tmp_path):
    """The whole pipeline (random tiny detector and SAM): map and regions. The MTD prompts, with at
    most 4 boxes per prompt so that SAM decodes a few dozen boxes, not the random detector's 150+."""
    prompts = tmp_path / "mtd_capped.json"
    prompts.write_text(json.dumps({"name": "mtd", "object_prompt": "mtd", "top_k": 5, "defect_area_ratio": 0.9,
                                   "defect_prompts": ["black hole. blow hole. break. crack. fray. uneven.", "defect."],
                                   "options": {"max_boxes_per_prompt": 4}}))
    check_against_python(line_side, full_tiny_engine_dir, {"ppm": images["ppm"]}, tmp_path, prompts)


def test_line_side_prompt_file_and_errors(line_side, lite_engine_dir, images, tmp_path):  # noqa: F811
    prompts = tmp_path / "tile.yaml"
    prompts.write_text("name: tile\nobject_prompt: tile\ndefect_prompts: ['crack.']\n")
    done = run_line_side(line_side, lite_engine_dir, images["pgm"], tmp_path / "a.npy", "--config", str(prompts))
    assert done.returncode == 0, done.stderr
    done = run_line_side(line_side, tmp_path / "none", images["pgm"], tmp_path / "b.npy")
    assert done.returncode == 1 and "engines dir" in done.stderr and "does not exist" in done.stderr
    broken = tmp_path / "cut.ppm"
    broken.write_bytes(images["ppm"].read_bytes()[:500])
    done = run_line_side(line_side, lite_engine_dir, broken, tmp_path / "c.npy")
    assert done.returncode == 2 and "truncated pixel data" in done.stderr
    done = run_line_side(line_side, lite_engine_dir, tmp_path / "missing.ppm", tmp_path / "e.npy")
    assert done.returncode == 2 and "missing.ppm: cannot open" in done.stderr
    done = run_line_side(line_side, lite_engine_dir, images["pgm"], tmp_path / "d.npy",
                         env={"SAA_PYTHON": str(tmp_path / "no-python")})
    assert done.returncode == 1 and "no-python" in done.stderr and "SAA_PYTHON" in done.stderr
    assert subprocess.run([str(line_side)], capture_output=True).returncode == 2  # usage


def test_line_side_thresholds_and_mask_match_the_cli(line_side, lite_engine_dir, images, tmp_path):  # noqa: F811
    """saa_open_ex's thresholds through the example: the decision and the mask equal the CLI's."""
    image = images["ppm"]
    run_cli(lite_engine_dir, [image], tmp_path / "free")
    values = np.load(tmp_path / "free" / f"{image.stem}_map.npy")
    image_threshold, pixel_threshold = float(values.max()) / 2, float(np.quantile(values, 0.95))
    flags = ("--dataset", "mtd", "--category", "mtd", "--image-threshold", repr(image_threshold),
             "--pixel-threshold", repr(pixel_threshold))
    run_cli(lite_engine_dir, [image], tmp_path / "cli", *flags)
    done = run_line_side(line_side, lite_engine_dir, image, tmp_path / "map.npy", *flags,
                         "--mask", str(tmp_path / "mask.pgm"), "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert "line_side: NG (score" in done.stderr
    mask = cv2.imread(str(tmp_path / "mask.pgm"), cv2.IMREAD_GRAYSCALE)
    cli_mask = cv2.imread(str(tmp_path / "cli" / f"{image.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(mask > 0, cli_mask > 0)
    assert 0 < (mask > 0).mean() < 0.2
    no_pixel = run_line_side(line_side, lite_engine_dir, image, tmp_path / "b.npy", "--dataset", "mtd",
                             "--category", "mtd", "--mask", str(tmp_path / "none.pgm"))
    assert no_pixel.returncode == 1 and "no pixel threshold" in no_pixel.stderr
    bad = run_line_side(line_side, lite_engine_dir, image, tmp_path / "c.npy", "--dataset", "mtd", "--category", "mtd",
                        "--memory", str(tmp_path / "missing.npz"))
    assert bad.returncode == 1 and "missing.npz" in bad.stderr
    assert run_line_side(line_side, lite_engine_dir, image, tmp_path / "d.npy", "--dataset", "mtd", "--category",
                         "mtd", "--threads", "two").returncode == 2  # usage


def test_sixteen_bit_pgm_matches_python_api(line_side, lite_engine_dir, images, tmp_path):  # noqa: F811
    """16-bit PGM keeps its high byte in the example's reader, as runtime.image_io does."""
    gray = cv2.imread(str(images["pgm"]), cv2.IMREAD_UNCHANGED).astype(np.uint16) * 257 + 3
    path = tmp_path / "deep.pgm"
    assert cv2.imwrite(str(path), gray)
    done = run_line_side(line_side, lite_engine_dir, path, tmp_path / "deep.npy")
    assert done.returncode == 0, done.stderr
    from runtime.image_io import read_image

    expected = Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd")(read_image(path)).anomaly_map
    np.testing.assert_allclose(np.load(tmp_path / "deep.npy"), expected, rtol=0, atol=MAP_TOLERANCE)


THREADS_C = r"""
/* 4 threads in a program without Python: one handle shared, then one handle per thread.
   Each thread segments its own crop of one gray frame, passed with the frame's stride. */
#include "saa.h"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { THREADS = 4 };
static int height, width, crop_h, crop_w;
static unsigned char *frame;
static float *single[THREADS];
static saa_pipeline *handles[THREADS];
static int failures;

static const unsigned char *crop(int i) {
    return frame + (size_t)(i * (height - crop_h) / 3) * width + i * (width - crop_w) / 3;
}

static int segment(saa_pipeline *h, int i, float *out) {
    int n = -1;
    int status = saa_infer(h, crop(i), crop_h, crop_w, width, 1, out, 0, 0, NULL, 0, &n);
    if (status != SAA_OK) fprintf(stderr, "thread %d: %d %s\n", i, status, saa_last_error(h));
    return status;
}

static void *work(void *arg) {
    int i = (int)(size_t)arg;
    float *out = malloc(sizeof(float) * crop_h * crop_w);
    if (segment(handles[i], i, out) != SAA_OK || memcmp(out, single[i], sizeof(float) * crop_h * crop_w) != 0)
        __atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
    free(out);
    return NULL;
}

static int run_threads(void) {
    pthread_t threads[THREADS];
    for (int i = 0; i < THREADS; ++i) pthread_create(&threads[i], NULL, work, (void *)(size_t)i);
    for (int i = 0; i < THREADS; ++i) pthread_join(threads[i], NULL);
    return failures;
}

int main(int argc, char **argv) {
    if (argc != 7) return 2;
    height = atoi(argv[3]); width = atoi(argv[4]); crop_h = height * 2 / 3; crop_w = width * 2 / 3;
    frame = malloc((size_t)height * width);
    FILE *in = fopen(argv[2], "rb");
    if (!in || fread(frame, 1, (size_t)height * width, in) != (size_t)height * width) return 2;
    fclose(in);
    saa_pipeline *shared = NULL;
    if (saa_open(argv[1], argv[5], "cpu", &shared) != SAA_OK) {
        fprintf(stderr, "%s\n", saa_last_error(NULL));
        return 1;
    }
    for (int i = 0; i < THREADS; ++i) {
        single[i] = malloc(sizeof(float) * crop_h * crop_w);
        if (segment(shared, i, single[i]) != SAA_OK) return 1;
    }
    FILE *out = fopen(argv[6], "wb");
    fwrite(single[0], sizeof(float), (size_t)crop_h * crop_w, out);
    fclose(out);
    for (int i = 0; i < THREADS; ++i) handles[i] = shared;
    printf("one handle: %d mismatches\n", run_threads());
    failures = 0;
    for (int i = 0; i < THREADS; ++i)
        if (saa_open(argv[1], argv[5], "cpu", &handles[i]) != SAA_OK) return 1;
    printf("four handles: %d mismatches\n", run_threads());
    for (int i = 0; i < THREADS; ++i) saa_close(handles[i]);
    saa_close(shared);
    return 0;
}
"""


def test_c_threads_in_embedded_interpreter(flags, lite_engine_dir, images, tmp_path):  # noqa: F811
    """PyGILState_Ensure from C threads of a program that has no Python of its own."""
    source = tmp_path / "threads.c"
    source.write_text(THREADS_C)
    binary = tmp_path / "threads"
    subprocess.run(["cc", "-O2", "-Wall", str(source), *flags, "-pthread", "-o", str(binary)], check=True)
    gray = cv2.imread(str(images["pgm"]), cv2.IMREAD_GRAYSCALE)
    raw = tmp_path / "frame.raw"
    raw.write_bytes(np.ascontiguousarray(gray).tobytes())
    height, width = gray.shape
    out = tmp_path / "crop0.f32"
    done = subprocess.run([str(binary), str(lite_engine_dir), str(raw), str(height), str(width), "mtd/mtd", str(out)],
                          capture_output=True, text=True, timeout=600, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["one handle: 0 mismatches", "four handles: 0 mismatches"], done.stderr
    crop = gray[:height * 2 // 3, :width * 2 // 3]  # thread 0's crop, read in place with the frame's stride
    expected = Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd")(crop).anomaly_map
    np.testing.assert_allclose(np.fromfile(out, np.float32).reshape(crop.shape), expected, rtol=0, atol=MAP_TOLERANCE)


SIGNALS_C = r"""
#include <saa.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static const char *sigint(void) {
    struct sigaction action;
    sigaction(SIGINT, NULL, &action);
    return action.sa_handler == SIG_DFL ? "default" : "changed";
}

int main(int argc, char **argv) {
    saa_pipeline *pipe = NULL, *none = NULL;
    static uint8_t pixels[64 * 64];
    static float map[64 * 64];
    int regions = 0;
    signal(SIGINT, SIG_DFL);
    int opened = saa_open(argv[1], "mtd/mtd", NULL, &pipe);
    printf("open %d, SIGINT %s\n", opened, sigint());
    int ran = saa_infer(pipe, pixels, 64, 64, 64, 1, map, 0, 0, NULL, 0, &regions);
    printf("infer %d, SIGINT %s\n", ran, sigint());
    int failed = saa_open(argv[2], "mtd/mtd", NULL, &none); /* a path that is not UTF-8 */
    const char *message = saa_last_error(NULL);
    printf("bad open %d, message %s\n", failed, strstr(message, "does not exist") ? "names the fault" : message);
    saa_close(pipe);
    return 0;
}
"""


def test_plain_c_program_keeps_its_signal_handlers_and_gets_messages_for_any_path(flags, lite_engine_dir,  # noqa: F811
                                                                                tmp_path):
    """Ctrl-C must still stop a C program after saa_open (Python's signal module took SIGINT
    over); a failure on a path that is not UTF-8 still comes with its message."""
    source, binary = tmp_path / "signals.c", tmp_path / "signals"
    source.write_text(SIGNALS_C)
    subprocess.run(["cc", "-O2", "-Wall", str(source), *flags, "-pthread", "-o", str(binary)], check=True)
    odd = os.fsencode(tmp_path) + b"/\xff-engines"
    done = subprocess.run([str(binary).encode(), os.fsencode(lite_engine_dir), odd], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["open 0, SIGINT default", "infer 0, SIGINT default",
                                        "bad open -4, message names the fault"], done.stderr


def test_soak_quick(flags, lite_engine_dir, tmp_path):  # noqa: F811
    """bench.soak end to end with a handful of calls (the real soak is 1,000)."""
    from bench import soak

    report = tmp_path / "soak.json"
    assert soak.main(["--engine-dir", str(lite_engine_dir), "--calls", "4", "--warmup", "1", "--sample-every", "2",
                      "--compare-calls", "1", "--overhead-calls", "5", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["calls"] == 4 and len(data["rss_samples"]) == 3
    assert data["abi_overhead_us_without_pipeline"] > 0
    assert soak.growth_per_call([0, 10, 20], [100, 200, 300]) == pytest.approx(10.0)
