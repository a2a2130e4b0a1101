"""The GPU code paths, run on onnxruntime's CPU provider: same answers as the CPU paths.

On a GPU the pipeline binds graph outputs to the device (GroundingDINO image features ->
head, SAM embedding -> decoder) and runs the one-object kNN as an onnxruntime graph. No GPU
is in reach here, so these tests force those paths on the CPU provider and check that they
give what the default CPU paths give; what only a GPU can show (speed, CUDA numerics) is in
docs/latency.md.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime import manifest as mf
from runtime.stages.detector import Detector
from runtime.errors import ConfigError, EngineError
from runtime.image_io import read_image
from runtime.stages.saliency import SaliencyExtractor
from runtime.stages.segmenter import Segmenter, upscale_mask_logits
from runtime.engine.runners import DeviceRunner, PlainRunner, runner_for, to_host
from runtime.engine.sessions import session_factory
from runtime.settings import EngineSettings

BOTTLE = Path(__file__).resolve().parent / "data" / "bottle_demo.png"
CAPTIONS = ["bottle,", "defect on bottle", "crack. black hole."]


@pytest.fixture(scope="module")
def full_tiny(full_tiny_engine_dir) -> mf.Manifest:
    return mf.load_manifest(full_tiny_engine_dir)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return read_image(BOTTLE)


def test_runner_choice_follows_the_session_device(full_tiny):
    session = session_factory(EngineSettings(threads=1))(full_tiny.model_path(mf.SAM_DECODER))
    assert isinstance(runner_for(session), PlainRunner)  # CPU sessions: plain run
    assert isinstance(runner_for(session, io_binding=True), DeviceRunner)

    class StandIn:  # objects with run() only (tests' fakes) get the plain runner
        def run(self, names, feeds):
            return [len(feeds)]

    assert runner_for(StandIn()).run(["x"], {"a": 1}, keep=("x",)) == [1]
    assert to_host(ort.OrtValue.ortvalue_from_numpy(np.arange(3.0))).tolist() == [0.0, 1.0, 2.0]


def test_detector_with_io_binding_equals_plain_runs(full_tiny, image):
    make = session_factory(EngineSettings(threads=1))
    plain, bound = Detector(full_tiny, make), Detector(full_tiny, make, io_binding=True)
    rgb = np.ascontiguousarray(image[:, :, ::-1])
    features = bound.encode_image(rgb)
    assert all(isinstance(value, ort.OrtValue) for value in features.tensors.values())  # stayed "on the device"
    expected = plain.detect(plain.encode_image(rgb), plain.encode_text(CAPTIONS))
    got = bound.detect(features, bound.encode_text(CAPTIONS))
    assert len(got) == len(expected) == len(CAPTIONS)
    for ours, theirs in zip(got, expected):
        np.testing.assert_array_equal(ours.logits, theirs.logits)
        np.testing.assert_array_equal(ours.boxes, theirs.boxes)
        np.testing.assert_array_equal(ours.query_index, theirs.query_index)


def test_head_with_fixed_shapes_gives_the_same_detections(full_tiny, image):
    """GPU pipelines reopen the head with the config's caption and token counts fixed."""
    make = session_factory(EngineSettings(threads=1))
    plain, fixed = Detector(full_tiny, make), Detector(full_tiny, make, io_binding=True)
    rgb = np.ascontiguousarray(image[:, :, ::-1])
    text = fixed.encode_text(CAPTIONS)
    dims = fixed.fix_head_shapes(text)
    assert dims == {"prompts": len(CAPTIONS), "tokens": int(text.encoded.lengths.max())} == fixed.head_dims
    assert fixed.max_prompts_per_run == len(CAPTIONS)  # one head run takes them all
    expected = plain.detect(plain.encode_image(rgb), plain.encode_text(CAPTIONS))
    got = fixed.detect(fixed.encode_image(rgb), text)
    for ours, theirs in zip(got, expected, strict=True):
        np.testing.assert_allclose(ours.logits, theirs.logits, atol=1e-5)
        np.testing.assert_allclose(ours.boxes, theirs.boxes, atol=1e-5)
        np.testing.assert_array_equal(ours.query_index, theirs.query_index)
    with pytest.raises(EngineError, match="gdino_head failed"):  # other captions no longer fit the head
        fixed.detect(fixed.encode_image(rgb), fixed.encode_text(CAPTIONS[:2]))
    assert Detector(full_tiny, lambda path: make(path)).fix_head_shapes(text) == {}  # a factory without fixed dims
    with pytest.raises(EngineError, match="1 of 3 captions at a time"):
        Detector(full_tiny, make, max_prompts_per_run=1).fix_head_shapes(text)


def test_segmenter_with_io_binding_equals_plain_runs(full_tiny, image):
    make = session_factory(EngineSettings(threads=1))
    plain, bound = Segmenter(full_tiny, make), Segmenter(full_tiny, make, io_binding=True)
    plain.set_image(image)
    bound.set_image(image)
    assert isinstance(bound._embedding, ort.OrtValue) and bound._mask_runner is not None
    height, width = image.shape[:2]
    boxes = np.array([[10, 20, 300, 400], [0, 0, width - 1, height - 1], [500, 100, 880, 700]], np.float32)
    expected, got = plain.predict_boxes(boxes, chunk=2), bound.predict_boxes(boxes, chunk=2)
    assert got.shape == expected.shape and got.dtype == bool
    # The bound path upscales in runtime.stages.mask_graph (onnxruntime Resize), the plain one with cv2:
    # the same bilinear steps, so masks differ only where a logit sits within ~1e-4 of 0.
    low_res, _ = plain.decode(plain.transform_boxes(boxes))
    logits = np.stack([upscale_mask_logits(m, plain._input_size, plain._original_size, plain.image_size) for m in low_res[:, 0]])
    differ = got != expected
    assert np.abs(logits[differ]).max(initial=0.0) < 1e-4
    assert differ.mean() < 1e-4 and expected.any() and (~expected).any()


def test_decoder_with_a_fixed_box_count_pads_and_drops_the_copies(full_tiny, image):
    """GPU paths reopen SAM's decoder for decoder_chunk boxes a call: 5 boxes in chunks of 2
    are decoded as 2 + 2 + (1 + a copy); the copy's mask is made and never used."""
    from runtime.stages.mask_fusion import MaskFusion

    make = session_factory(EngineSettings(threads=1))
    plain, fixed = Segmenter(full_tiny, make, io_binding=True), Segmenter(full_tiny, make, io_binding=True)
    assert fixed.fix_box_count(2) and fixed.decoder_boxes == 2
    for segmenter in (plain, fixed):
        segmenter.set_image(image)
    height, width = image.shape[:2]
    boxes = np.array([[10, 20, 300, 400], [0, 0, width - 1, height - 1], [500, 100, 880, 700],
                      [40, 40, 90, 120], [600, 600, 700, 650]], np.float32)
    expected = plain.predict_boxes(boxes, chunk=2)
    np.testing.assert_array_equal(fixed.predict_boxes(boxes, chunk=7), expected)  # the fixed count wins
    masks = fixed.predict_boxes(boxes, on_device=True)
    assert [int(c.shape()[0]) for c in masks.chunks] == [2, 2, 2] and masks.sizes == [2, 2, 1] and len(masks) == 5
    np.testing.assert_array_equal(masks.to_host(), expected)
    saliency = np.random.default_rng(0).random((height, width)).astype(np.float32)
    means, areas = MaskFusion("cpu").mean_inside_masks(saliency, masks)
    assert len(means) == 5 and areas.tolist() == expected.reshape(5, -1).sum(axis=1).tolist()
    with pytest.raises(EngineError, match="positive integer"):
        fixed.fix_box_count(0)
    assert not Segmenter(full_tiny, make).fix_box_count(2)  # the CPU path (masks made with cv2) keeps its decoder


def test_fixed_box_counts_double_from_eight_up_to_the_chunk():
    from runtime.stages.segmenter import fixed_box_counts

    assert fixed_box_counts(32) == (8, 16, 32) and fixed_box_counts(64) == (8, 16, 32, 64)
    assert fixed_box_counts(48) == (8, 16, 32, 48) and fixed_box_counts(9) == (8, 9)
    assert fixed_box_counts(8) == (8,) and fixed_box_counts(5) == (5,) and fixed_box_counts(1) == (1,)


def test_each_chunk_takes_the_smallest_fixed_decoder_that_fits_with_the_same_masks(full_tiny, image):
    """Fixed counts 8 and 16 for decoder_chunk 16: 20 boxes go as 16 + (4 padded to 8), 3 boxes as
    (3 padded to 8), where one fixed count padded every chunk to 16. The masks are those of that
    one count to the bit (a box's logits do not depend on the boxes beside it in a fixed-count
    call); the decoder for 16 opens with fix_box_count, the one for 8 on its first chunk."""
    make = session_factory(EngineSettings(threads=1))
    ladder, single = Segmenter(full_tiny, make, io_binding=True), Segmenter(full_tiny, make, io_binding=True)
    assert ladder.fix_box_count(16) and ladder.decoder_boxes == 16 and ladder.decoder_box_counts == (8, 16)
    assert ladder.opened_box_counts == [16]
    assert single.fix_box_count(16)
    single.decoder_box_counts = (16,)  # one fixed count: every chunk padded to 16
    dynamic = Segmenter(full_tiny, make, io_binding=True)
    for segmenter in (ladder, single, dynamic):
        segmenter.set_image(image)
    height, width = image.shape[:2]
    corners = np.random.default_rng(3).uniform(0, [width, height], (20, 2, 2)).astype(np.float32)
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1) + 8], axis=1)  # xyxy, none empty
    sizes = []
    real_decode = ladder.decode
    ladder.decode = lambda frame, keep_on_device=False: sizes.append(len(frame)) or real_decode(frame, keep_on_device)
    for count in (20, 3, 16, 17):
        sizes.clear()
        expected = single.predict_boxes(boxes[:count])
        np.testing.assert_array_equal(ladder.predict_boxes(boxes[:count], chunk=7), expected)  # the fixed counts win
        assert sizes == {20: [16, 8], 3: [8], 16: [16], 17: [16, 8]}[count]
        masks = ladder.predict_boxes(boxes[:count], on_device=True)
        assert [int(c.shape()[0]) for c in masks.chunks] == sizes[-len(masks.chunks):]
        assert masks.sizes == {20: [16, 4], 3: [3], 16: [16], 17: [16, 1]}[count] and len(masks) == count
        np.testing.assert_array_equal(masks.to_host(), expected)
        # Against the dynamic-count decoder: fixed shapes optimise to other float32 roundings (~1e-7),
        # so only pixels whose logit sits at 0 may differ.
        assert (dynamic.predict_boxes(boxes[:count], chunk=16) != expected).mean() < 1e-4
    assert ladder.opened_box_counts == [8, 16]


def test_static_fixed_decoders_each_hold_their_buffers(full_tiny, image):
    """With CUDA graphs asked for (fixed buffers on the CPU provider), every fixed-count decoder
    runs through its own fixed buffers, and the pipeline's maps are those of one fixed count."""
    from runtime.config import resolve_config
    from runtime.pipeline import Pipeline

    config = resolve_config("mvtec", "bottle", None, {"decoder_chunk": 16})
    single = Pipeline(full_tiny, config, threads=1, io_binding=True, static_shapes=True, cuda_graphs=True)
    single.segmenter.decoder_box_counts = (16,)  # every chunk padded to 16
    static = Pipeline(full_tiny, config, threads=1, io_binding=True, static_shapes=True, cuda_graphs=True)
    assert static.segmenter.decoder_box_counts == (8, 16)
    for picture in (image, np.ascontiguousarray(image[::-1]), image):
        expected, got = single(picture), static(picture)
        assert len(got.regions) > 0 and [r.box for r in got.regions] == [r.box for r in expected.regions]
        np.testing.assert_array_equal(got.anomaly_map, expected.anomaly_map)
    static.warm_up()  # one box: the decoder for 8 boxes
    assert static.segmenter.opened_box_counts == [8, 16] and single.segmenter.opened_box_counts == [16]
    runners = [runner for _, runner in static.segmenter._fixed_decoders.values()]
    assert all(runner.static for runner in runners) and len({id(r) for r in runners}) == len(runners)
    assert static.cuda_graphs["sam_decoder"] == "captured" and not any("@" in key for key in static.cuda_graphs)


@pytest.mark.parametrize("preset", ["reference", "tuned"])
def test_saliency_knn_graph_equals_the_numba_kernels(lite_engine_dir, image, preset):
    from runtime.stages.saliency import preset_settings

    manifest = mf.load_manifest(lite_engine_dir)
    settings = preset_settings(manifest, preset)
    make = session_factory(EngineSettings(threads=1))
    host = SaliencyExtractor(manifest, make, settings)
    graph = SaliencyExtractor(manifest, make, settings, knn_device="cpu")
    assert host.knn_session is None and graph.knn_session is not None
    placed = []
    run_cnn = graph._run
    graph._run = lambda resized, on_device=False: placed.append(on_device) or run_cnn(resized, on_device)
    expected, got = host.single_object_saliency(image), graph.single_object_saliency(image)
    # The reference settings feed the CNN's output to the kNN graph where it is (on a GPU: no
    # round trip of the features through the host); a contrast step or padding keeps them on the host.
    assert placed == [settings.contrast == "none" and not settings.pad and graph.channel_index is None]
    # The graph sums its means in float32 in another order: agreement to rounding, not bits.
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    assert graph.with_settings(settings).knn_session is graph.knn_session  # shared, like the CNN session


def test_cpu_head_runs_take_as_many_captions_as_fit(full_tiny, image):
    from runtime.stages.detector import CPU_HEAD_POSITIONS, ImageFeatures

    detector = Detector(full_tiny, session_factory(EngineSettings(threads=1)))

    def features(positions: int) -> ImageFeatures:
        return ImageFeatures({"vision_features": np.zeros((1, positions, 1), np.float32)}, (1, 1), (1, 1), True)

    assert detector._auto_prompts_per_run(features(1045), 5) == 5          # tiny engines: all at once
    assert detector._auto_prompts_per_run(features(13294), 5) == 1         # Swin-T at 800x800: one by one
    assert detector._auto_prompts_per_run(features(CPU_HEAD_POSITIONS // 3), 5) == 3
    bound = Detector(full_tiny, session_factory(EngineSettings(threads=1)), io_binding=True)  # OrtValue features
    on_device = bound.encode_image(np.ascontiguousarray(image[:, :, ::-1]))
    assert bound._auto_prompts_per_run(on_device, 5) == 5


def test_pipeline_gpu_paths_agree_with_the_cpu_paths(full_tiny, image):
    """The whole pipeline with every GPU path on the CPU provider: features, embedding and masks
    kept "on the device", masks scored and fused by runtime.stages.mask_fusion, the kNN as a graph."""
    from runtime.config import resolve_config
    from runtime.stages.mask_fusion import DeviceMasks
    from runtime.pipeline import Pipeline

    config = resolve_config("mvtec", "bottle", None, {"decoder_chunk": 16})
    plain = Pipeline(full_tiny, config, threads=1)
    bound = Pipeline(full_tiny, config, threads=1, io_binding=True, static_shapes=True)
    assert plain.mask_fusion is None and bound.mask_fusion is not None and bound.saliency.knn_session is not None
    assert bound.detector.head_dims and not plain.detector.head_dims
    assert bound.segmenter.decoder_boxes == 16 and plain.segmenter.decoder_boxes is None
    made = []
    real = bound.segmenter.predict_boxes
    bound.segmenter.predict_boxes = lambda *a, **kw: made.append(real(*a, **kw)) or made[-1]
    expected, got = plain(image), bound(image)
    assert isinstance(made[0], DeviceMasks) and len(made[0].chunks) > 1  # several chunks fused on the device
    assert len(got.regions) == len(expected.regions) > 5
    for ours, theirs in zip(got.regions, expected.regions):
        # the fixed-shape head fuses MatMul + Add into Gemm: boxes move by float32 rounding (~3e-5 px)
        np.testing.assert_allclose(ours.box, theirs.box, atol=1e-3)
        assert ours.in_top_k == theirs.in_top_k
        assert abs(ours.mask_area - theirs.mask_area) <= 0.001 * max(theirs.mask_area, 1000)  # logits near 0
        assert ours.score == pytest.approx(theirs.score, rel=1e-3)
    np.testing.assert_allclose(got.saliency_map, expected.saliency_map, atol=2e-5)
    # The kNN graph's float32 means (2e-5) move the rescoring factors by ~1e-5 relative; mask
    # pixels whose logit sits within ~1e-4 of 0 differ between the graph and cv2 upscaling.
    assert got.anomaly_map.dtype == np.float32 and expected.anomaly_map.max() > 0
    far = np.abs(got.anomaly_map - expected.anomaly_map) > 1e-4 * expected.anomaly_map.max()
    assert far.mean() < 1e-3


def test_static_buffers_for_cuda_graphs_give_the_same_maps(full_tiny, image):
    """cuda_graphs=True on the CPU provider: no graph is captured there, but the image graph,
    the fixed-shape head and SAM's encoder run through fixed buffers exactly as they would."""
    from runtime.config import resolve_config
    from runtime.pipeline import Pipeline

    config = resolve_config("mvtec", "bottle", None, {})
    base = Pipeline(full_tiny, config, threads=1, io_binding=True, static_shapes=True)
    static = Pipeline(full_tiny, config, threads=1, io_binding=True, static_shapes=True, cuda_graphs=True)
    assert static.cuda_graphs == {"gdino_image": "captured", "gdino_head": "captured", "sam_encoder": "captured",
                                  "sam_decoder": "captured"}
    assert base.cuda_graphs == {} and static.segmenter._encoder_runner.static
    flipped = np.ascontiguousarray(image[::-1])
    for picture in (image, flipped, image):  # new values through the same buffers each call
        expected, got = base(picture), static(picture)
        assert [r.box for r in got.regions] == [r.box for r in expected.regions]
        np.testing.assert_array_equal(got.anomaly_map, expected.anomaly_map)
    with pytest.raises(ConfigError, match="need the GPU paths"):
        Pipeline(full_tiny, config, threads=1, io_binding=False, cuda_graphs=True)


def test_graphs_onnxruntime_refuses_fall_back_to_plain_sessions(full_tiny, image, monkeypatch):
    from runtime.config import resolve_config
    from runtime.pipeline import Pipeline

    make = session_factory(EngineSettings(threads=1))

    def refusing(path, fixed_dims=None, cuda_graphs=None):
        if cuda_graphs and "sam_encoder" in str(path):
            raise EngineError(f"{path}: cannot load engine (all nodes not partitioned to the CUDA EP)")
        return make(path, fixed_dims=fixed_dims, cuda_graphs=cuda_graphs)

    refusing.fixes_dims = True
    segmenter = Segmenter(full_tiny, refusing, io_binding=True, cuda_graphs=True)
    assert "not partitioned" in segmenter.cuda_graphs["sam_encoder"] and not segmenter._encoder_runner.static
    detector = Detector(full_tiny, refusing, io_binding=True, cuda_graphs=True)
    assert detector.cuda_graphs == {"gdino_image": "captured"}
    config = resolve_config("mvtec", "bottle", None, {})
    assert Pipeline(full_tiny, config, threads=1).cuda_graphs == {}
    # A fixed-shape session onnxruntime will not open leaves the dynamic one in place, with the reason.

    def no_fixed_dims(path, fixed_dims=None, cuda_graphs=None):
        if fixed_dims:
            raise EngineError(f"{path}: cannot load engine (dimension override refused)")
        return make(path, cuda_graphs=cuda_graphs)

    no_fixed_dims.fixes_dims = True
    monkeypatch.setattr("runtime.pipeline.SessionFactory", lambda *a, **kw: no_fixed_dims)
    pipeline = Pipeline(full_tiny, config, threads=1, io_binding=True, static_shapes=True)
    assert "override refused" in pipeline.static_shapes_refused and not pipeline.detector.head_dims
    assert len(pipeline(image).regions) > 0  # still runs, with the dynamic-shape head and decoder


@pytest.mark.parametrize("static_shapes", [True, False])
def test_pipelines_open_each_graph_once(full_tiny, monkeypatch, static_shapes):
    """The head and SAM's decoder are not opened dynamic first and then again with fixed
    shapes; a broken one still fails when the pipeline is built, not on its first image."""
    from runtime.config import resolve_config
    from runtime.pipeline import Pipeline

    make = session_factory(EngineSettings(threads=1))
    opened: list[tuple[str, bool]] = []

    def counting(path, fixed_dims=None, cuda_graphs=None):
        opened.append((Path(path).stem, bool(fixed_dims)))
        return make(path, fixed_dims=fixed_dims, cuda_graphs=cuda_graphs)

    counting.fixes_dims = True
    monkeypatch.setattr("runtime.pipeline.SessionFactory", lambda *a, **kw: counting)
    config = resolve_config("mvtec", "bottle", None, {})
    Pipeline(full_tiny, config, threads=1, io_binding=True, static_shapes=static_shapes)
    graphs = [name for name, _ in opened]
    assert sorted(graphs) == sorted(set(graphs)) and {"gdino_head", "sam_decoder"} <= set(graphs)
    assert dict(opened)["gdino_head"] == dict(opened)["sam_decoder"] == static_shapes

    def broken_decoder(path, fixed_dims=None, cuda_graphs=None):
        if "sam_decoder" in str(path):
            raise EngineError(f"{path}: cannot load engine (truncated)")
        return make(path, fixed_dims=fixed_dims, cuda_graphs=cuda_graphs)

    broken_decoder.fixes_dims = True
    monkeypatch.setattr("runtime.pipeline.SessionFactory", lambda *a, **kw: broken_decoder)
    with pytest.raises(EngineError, match="sam_decoder.onnx: cannot load engine"):
        Pipeline(full_tiny, config, threads=1, io_binding=True, static_shapes=static_shapes)


def test_head_dims_come_from_the_manifest_or_the_session(full_tiny):
    """fix_head_shapes names the dimensions from the manifest's input records; where a
    manifest lacks them (hand-edited, older), from the dynamic session's inputs."""
    make = session_factory(EngineSettings(threads=1))
    specs = full_tiny.inputs("gdino_head")
    assert specs is not None and [s.name for s in specs] == [i.name for i in make(full_tiny.model_path("gdino_head")).get_inputs()]
    text = Detector(full_tiny, make).encode_text(CAPTIONS)
    expected = {"prompts": len(CAPTIONS), "tokens": int(text.encoded.lengths.max())}
    assert Detector(full_tiny, make, io_binding=True).fix_head_shapes(text) == expected
    data = copy.deepcopy(full_tiny.data)
    del data["models"]["gdino_head"]["inputs"]
    bare = mf.Manifest(full_tiny.engine_dir, data)
    assert bare.inputs("gdino_head") is None
    assert Detector(bare, make, io_binding=True).fix_head_shapes(text) == expected


@pytest.mark.gpu
def test_cuda_pipeline_agrees_with_the_cpu_pipeline(full_tiny_engine_dir, image):
    """The whole pipeline on onnxruntime's CUDA provider (IO binding, mask graph, kNN graph)."""
    from runtime.pipeline import Pipeline

    cpu = Pipeline.open(full_tiny_engine_dir, dataset="mvtec", category="bottle", threads=1)
    cuda = Pipeline.open(full_tiny_engine_dir, dataset="mvtec", category="bottle", device="cuda")
    expected, got = cpu(image), cuda(image)
    assert len(got.regions) == len(expected.regions)
    np.testing.assert_allclose([r.box for r in got.regions], [r.box for r in expected.regions], atol=0.5)
    np.testing.assert_allclose(got.saliency_map, expected.saliency_map, atol=1e-3)
    # CUDA kernels (TF32 matmuls where onnxruntime enables them) move SAM logits near 0 across the threshold.
    assert (np.abs(got.anomaly_map - expected.anomaly_map) > 1e-3).mean() < 1e-3


def test_overlapped_stages_give_the_same_results(full_tiny, image):
    """overlap=True: SAM's encoding and the saliency in a second thread while the head runs (after
    the calls that capture CUDA graphs); the maps and regions are those of the sequential pipeline."""
    from runtime.config import resolve_config
    from runtime.engine.overlap import OVERLAP_AFTER_CALLS
    from runtime.pipeline import Pipeline

    config = resolve_config("mvtec", "bottle", None, {})
    base = Pipeline(full_tiny, config, threads=1, io_binding=True, static_shapes=True, cuda_graphs=True)
    overlapped = Pipeline(full_tiny, config, threads=1, io_binding=True, static_shapes=True, cuda_graphs=True,
                          overlap=True)
    flipped = np.ascontiguousarray(image[::-1])
    pictures = [image, flipped] * (OVERLAP_AFTER_CALLS // 2 + 2)
    for call, picture in enumerate(pictures, start=1):
        expected, got = base(picture), overlapped(picture)
        assert ("overlap_wait" in got.timings_ms) == (call > OVERLAP_AFTER_CALLS)
        assert "overlap_wait" not in expected.timings_ms
        assert got.timings_ms["sam_encoder"] > 0 and got.timings_ms["saliency"] > 0
        assert [(r.box, r.score, r.in_top_k) for r in got.regions] == [(r.box, r.score, r.in_top_k) for r in expected.regions]
        np.testing.assert_array_equal(got.saliency_map, expected.saliency_map)
        np.testing.assert_array_equal(got.anomaly_map, expected.anomaly_map)
    overlapped.close()
    assert overlapped._side._executor is None  # the second thread is shut down


def test_an_error_in_either_thread_reaches_the_caller(full_tiny, image, monkeypatch):
    from runtime.config import resolve_config
    from runtime.engine.overlap import OVERLAP_AFTER_CALLS
    from runtime.pipeline import Pipeline

    pipeline = Pipeline(full_tiny, resolve_config("mvtec", "bottle", None, {}), threads=1, overlap=True)
    for _ in range(OVERLAP_AFTER_CALLS):
        pipeline(image)
    encoded = []
    real_set_image = pipeline.segmenter.set_image

    def failing_set_image(picture):
        raise EngineError("sam_encoder: run failed (out of memory)")

    monkeypatch.setattr(pipeline.segmenter, "set_image", failing_set_image)
    with pytest.raises(EngineError, match="sam_encoder: run failed"):
        pipeline(image)

    def slow_set_image(picture):  # still running when the head fails: the call waits for it
        import time

        time.sleep(0.2)
        encoded.append(real_set_image(picture))

    def failing_detect(*args):
        raise EngineError("gdino_head: run failed")

    monkeypatch.setattr(pipeline.segmenter, "set_image", slow_set_image)
    monkeypatch.setattr(pipeline.detector, "detect", failing_detect)
    with pytest.raises(EngineError, match="gdino_head"):
        pipeline(image)
    assert encoded == [None]  # the second thread had finished with the image when the error left
    pipeline.close()


@pytest.mark.gpu
def test_cuda_graphs_and_overlap_on_the_device_give_the_sequential_results(full_tiny_engine_dir, image):
    """On the CUDA provider: CUDA graphs captured, and SAM's encoder and the saliency running in a
    second thread beside the captured head, give what the plain sequential CUDA pipeline gives."""
    from runtime.config import resolve_config
    from runtime.engine.overlap import OVERLAP_AFTER_CALLS
    from runtime.pipeline import Pipeline

    manifest = mf.load_manifest(full_tiny_engine_dir)
    config = resolve_config("mvtec", "bottle", None, {})
    plain = Pipeline(manifest, config, device="cuda", cuda_graphs=False, overlap=False)
    fast = Pipeline(manifest, config, device="cuda", cuda_graphs=True, overlap=True)
    assert set(fast.cuda_graphs.values()) == {"captured"}, fast.cuda_graphs
    flipped = np.ascontiguousarray(image[::-1])
    for call, picture in enumerate([image, flipped] * (OVERLAP_AFTER_CALLS // 2 + 3), start=1):
        expected, got = plain(picture), fast(picture)
        assert ("overlap_wait" in got.timings_ms) == (call > OVERLAP_AFTER_CALLS)
        assert len(got.regions) == len(expected.regions)
        np.testing.assert_allclose([r.box for r in got.regions], [r.box for r in expected.regions], atol=1e-2)
        np.testing.assert_allclose(got.saliency_map, expected.saliency_map, atol=1e-4)
        # same kernels either way; cuDNN may sum in another order, which can move a SAM logit near 0
        assert (np.abs(got.anomaly_map - expected.anomaly_map) > 1e-3).mean() < 1e-3
    fast.close()


def test_the_device_canvas_gives_the_same_results(full_tiny, image):
    """device_canvas=True: both image graphs take their input from runtime.engine.device_canvas (through
    the fixed buffers of CUDA graphs too), images of two sizes; the same maps as the host canvas."""
    from runtime.config import resolve_config
    from runtime.pipeline import Pipeline

    config = resolve_config("mvtec", "bottle", None, {})
    base = Pipeline(full_tiny, config, threads=1, io_binding=True, static_shapes=True, cuda_graphs=True)
    on_device = Pipeline(full_tiny, config, threads=1, io_binding=True, static_shapes=True, cuda_graphs=True,
                         device_canvas=True)
    assert on_device.detector._canvas is not None and on_device.segmenter._canvas is not None
    assert base.detector._canvas is None and base.segmenter._canvas is None
    wide = np.ascontiguousarray(image[100:400])
    for picture in (image, wide, image):
        expected, got = base(picture), on_device(picture)
        assert [(r.box, r.score) for r in got.regions] == [(r.box, r.score) for r in expected.regions]
        np.testing.assert_array_equal(got.anomaly_map, expected.anomaly_map)
    with pytest.raises(ConfigError, match="device canvas needs the GPU paths"):
        Pipeline(full_tiny, config, threads=1, io_binding=False, device_canvas=True)
