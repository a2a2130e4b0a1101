"""The saa.edge custom ops (runtime/ops): the compiled MultiScaleDeformableAttention against
PyTorch's grid_sample sum, its errors, and the deformable-attention form traced with it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from runtime import ops
from runtime.engine import custom_ops as C
from runtime.settings import EngineSettings
from runtime.engine.sessions import check_gpu_kernel
from runtime.errors import EngineError
from runtime.ops import build

torch = pytest.importorskip("torch")

LEVELS = ((12, 10), (6, 5), (3, 3))  # odd, non-square levels: rows and columns must not be swapped


@pytest.fixture(scope="module")
def cpu_library() -> Path:
    """libsaa_ops.so, rebuilt first if it is older than its sources (pip install -e . builds it)."""
    if build.is_stale(ops.CPU_LIBRARY):
        build.build_cpu()
    return ops.CPU_LIBRARY


def op_model(levels=LEVELS) -> bytes:
    node = helper.make_node("MultiScaleDeformableAttention", ["value", "grids", "weights"], ["out"], domain=ops.DOMAIN,
                            spatial_shapes=[size for shape in levels for size in shape])
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("value", "grids", "weights")]
    graph = helper.make_graph([node], "msda", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)])
    return model.SerializeToString()


def op_session(library: Path, levels=LEVELS, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(op_model(levels), options, providers=["CPUExecutionProvider"])


def op_feeds(batch=2, queries=37, heads=3, channels=32, points=4, levels=LEVELS, spread=1.3, seed=0) -> dict[str, np.ndarray]:
    """Grids over [-spread, spread]: beyond 1 some samples fall partly or wholly off their level."""
    rng = np.random.default_rng(seed)
    positions = sum(h * w for h, w in levels)
    return {
        "value": rng.standard_normal((batch, positions, heads, channels), dtype=np.float32),
        "grids": rng.uniform(-spread, spread, (batch, queries, heads, len(levels), points, 2)).astype(np.float32),
        "weights": rng.random((batch, queries, heads, len(levels), points), dtype=np.float32),
    }


def torch_sum(feeds: dict[str, np.ndarray], levels=LEVELS) -> np.ndarray:
    from export.gdino_forms import FusedDeformableSum

    args = [torch.from_numpy(feeds[name]) for name in ("value", "grids", "weights")]
    return FusedDeformableSum.apply(*args, list(levels)).numpy()


@pytest.mark.parametrize("channels", [32, 5])  # 32: the compiled fast path; 5: the general loop
def test_cpu_op_equals_grid_sample_sum(cpu_library: Path, channels: int) -> None:
    feeds = op_feeds(channels=channels)
    got = op_session(cpu_library).run(["out"], feeds)[0]
    expected = torch_sum(feeds)
    assert got.shape == (2, 37, 3 * channels)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_cpu_op_reads_zeros_off_the_level(cpu_library: Path) -> None:
    """A sample whose corners all lie off its level adds nothing; on the border, only the inside corners count."""
    feeds = op_feeds(batch=1, queries=4, heads=1, channels=32, points=1, levels=((4, 4),))
    feeds["grids"][0, :, 0, 0, 0] = [[5.0, 0.0], [0.0, -5.0], [1.0, 1.0], [-1.25, 0.0]]  # off, off, corner, edge
    feeds["weights"][:] = 1.0
    got = op_session(cpu_library, ((4, 4),)).run(["out"], feeds)[0]
    np.testing.assert_allclose(got, torch_sum(feeds, ((4, 4),)), atol=1e-6)
    assert not got[0, :2].any() and got[0, 2:].any()


def test_cpu_op_is_the_same_on_one_thread_and_many(cpu_library: Path) -> None:
    feeds = op_feeds(queries=301)  # several 64-row chunks, the last one short
    one = op_session(cpu_library, threads=1).run(["out"], feeds)[0]
    many = op_session(cpu_library, threads=2).run(["out"], feeds)[0]
    np.testing.assert_array_equal(one, many)


@pytest.mark.parametrize("change, words", [
    (lambda f: f.update(value=f["value"][:, :-1]), "positions, spatial_shapes add up to"),
    (lambda f: f.update(weights=f["weights"][:, :, :, :, :2]), "weights must be"),
    (lambda f: f.update(grids=f["grids"][..., :1]), "grids must be"),
    (lambda f: f.update(value=f["value"][0]), "value must be"),
    (lambda f: f.update(grids=f["grids"][:, :, :2], weights=f["weights"][:, :, :2]), "do not match value"),
])
def test_cpu_op_names_bad_shapes(cpu_library: Path, change, words: str) -> None:
    feeds = op_feeds()
    change(feeds)
    with pytest.raises(Exception, match=words):
        op_session(cpu_library).run(["out"], feeds)


def test_cpu_op_refuses_bad_spatial_shapes(cpu_library: Path) -> None:
    with pytest.raises(Exception, match="spatial_shapes"):
        op_session(cpu_library, levels=((4, 0),)).run(["out"], op_feeds(levels=((4, 0),)))
    # 1 + 2^32 * 2^32 wraps to 1 in int64: it matched a 1-position value and the kernel read far
    # outside it (a review found it: garbage, or a crash). Sides are bounded now.
    wrapping = ((1, 1), (2 ** 32, 2 ** 32))
    feeds = {"value": np.ones((1, 1, 1, 1), np.float32), "grids": np.zeros((1, 1, 1, 2, 1, 2), np.float32),
             "weights": np.ones((1, 1, 1, 2, 1), np.float32)}
    with pytest.raises(Exception, match=r"spatial_shapes .* has a size outside 1\.\.16384"):
        op_session(cpu_library, levels=wrapping).run(["out"], feeds)


def nan_feeds() -> dict[str, np.ndarray]:
    """Non-finite samples, as a broken upstream layer would give: grid_sample's sum is NaN there."""
    feeds = op_feeds(queries=5, channels=32)
    feeds["grids"][0, 1, 0, 2, 3, 0] = np.nan  # one coordinate of one sample
    feeds["grids"][1, 2, 1, 0, 0, 1] = np.inf
    feeds["grids"][1, 3, 2, 1, 1] = [5.0, 5.0]  # off its level: it would add nothing...
    feeds["weights"][1, 3, 2, 1, 1] = np.nan  # ...but its weight is NaN
    return feeds


def test_cpu_op_shows_non_finite_samples_as_nan(cpu_library: Path) -> None:
    feeds = nan_feeds()
    got = op_session(cpu_library).run(["out"], feeds)[0]
    expected = torch_sum(feeds)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)  # NaN where torch has NaN, equal elsewhere
    heads = got.reshape(2, 5, 3, 32)
    for b, q, h in ((0, 1, 0), (1, 2, 1), (1, 3, 2)):
        assert np.isnan(heads[b, q, h]).all()
    assert np.isnan(heads).sum() == 3 * 32  # the other heads of those queries are untouched


def test_library_choice_and_missing_library(cpu_library: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert C.library_for("cpu") == cpu_library
    with pytest.raises(EngineError, match="SAA_OPS_LIBRARY"):
        C.library_for("cpu", tmp_path / "nothing.so")
    assert EngineSettings.from_environment({"SAA_OPS_LIBRARY": "/x/lib.so"}).ops_library == "/x/lib.so"
    monkeypatch.setattr(C, "CPU_LIBRARY", tmp_path / "libsaa_ops.so")
    monkeypatch.setattr(C, "CUDA_LIBRARY", tmp_path / "libsaa_ops_cuda.so")
    assert C.library_for("cpu") is None and C.library_for("cuda") is None


def test_a_gpu_without_the_cuda_library_falls_back_to_the_cpu_kernel_with_a_warning(
        cpu_library: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SAA_OPS_LIBRARY", raising=False)
    monkeypatch.setattr(C, "CUDA_LIBRARY", tmp_path / "libsaa_ops_cuda.so")
    monkeypatch.setattr(C, "_warned_cpu_fallback", False)
    with pytest.warns(UserWarning, match=r"runtime.ops.build --cuda"):
        assert C.library_for("cuda") == cpu_library
    built = tmp_path / "libsaa_ops_cuda.so"
    built.write_bytes(b"")  # present: chosen for GPUs, the CPU build for the CPU
    assert C.library_for("tensorrt") == built and C.library_for("cpu") == cpu_library


def test_a_fused_graph_without_the_library_says_what_to_build(cpu_library: Path, monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    from runtime.engine.sessions import session_factory

    path = tmp_path / "msda.onnx"
    path.write_bytes(op_model())
    session_factory()(path)  # loads with the library
    monkeypatch.delenv("SAA_OPS_LIBRARY", raising=False)
    monkeypatch.setattr(C, "CPU_LIBRARY", tmp_path / "libsaa_ops.so")
    with pytest.raises(EngineError, match=r"saa.edge::MultiScaleDeformableAttention .*python -m runtime.ops.build"):
        session_factory()(path)


def test_a_broken_library_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "libsaa_ops.so"
    broken.write_bytes(b"not a library")
    with pytest.raises(EngineError, match="cannot load the custom-op library"):
        C.register(ort.SessionOptions(), "cpu", broken)


def test_build_reports_a_missing_compiler(tmp_path: Path) -> None:
    with pytest.raises(build.BuildError, match="not found"):
        build.build_cpu(tmp_path / "lib.so", compiler="no-such-compiler-here")
    assert not list(tmp_path.iterdir())  # no partial file left


def fake_tool(path: Path, script: str) -> str:
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def test_build_retries_without_the_isa_clones_where_the_compiler_refuses_them(tmp_path: Path) -> None:
    """GCC 11 stops at target_clones("arch=x86-64-v4", ...) with "no dispatcher found": the build
    takes one more try with -DSAA_NO_CLONES (a slower library beats a failed pip install)."""
    calls = tmp_path / "calls"
    compiler = fake_tool(tmp_path / "old-c++", f'echo "$@" >> {calls}\n'
                         'case "$*" in *-DSAA_NO_CLONES*) exec c++ "$@";; esac\n'
                         'echo "saa_ops.cc:91:21: error: no dispatcher found for the versioning attributes" >&2; exit 1\n')
    library = build.build_cpu(tmp_path / "lib.so", compiler=compiler)
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 and "-DSAA_NO_CLONES" not in lines[0] and "-DSAA_NO_CLONES" in lines[1]
    feeds = op_feeds()
    np.testing.assert_allclose(op_session(library).run(["out"], feeds)[0], torch_sum(feeds), atol=2e-5, rtol=1e-5)
    failing = fake_tool(tmp_path / "broken-c++", 'echo "saa_ops.cc:1: error: expected ;" >&2; exit 1\n')
    with pytest.raises(build.BuildError, match="expected ;"):  # any other error: no second try
        build.build_cpu(tmp_path / "other.so", compiler=failing)


def test_cuda_archs_are_cut_to_what_the_nvcc_builds(tmp_path: Path) -> None:
    jetpack5 = fake_tool(tmp_path / "nvcc-11.4", "printf 'compute_53\\ncompute_72\\ncompute_75\\ncompute_80\\ncompute_86\\ncompute_87\\n'\n")
    assert build.supported_archs(jetpack5, build.CUDA_ARCHS) == ("75", "80", "86", "87")
    with pytest.raises(build.BuildError, match="builds none of the CUDA architectures 89 90"):
        build.supported_archs(jetpack5, ("89", "90"))
    unlisting = fake_tool(tmp_path / "nvcc-10", "echo 'nvcc fatal : Unknown option' >&2; exit 1\n")
    assert build.supported_archs(unlisting, ("89", "90")) == ("89", "90")  # cannot tell: nvcc decides


# The CUDA kernel's per-element body, compiled for the CPU and looped over every output element.
ELEMENT_HARNESS = r"""
#include "msda_element.h"
extern "C" void msda_all(const SaaMsdaShape* s, const float* value, const float* grids, const float* weights, float* out) {
  const int64_t total = s->batch * s->queries * s->heads * s->channels;
  for (int64_t index = 0; index < total; ++index) out[index] = saa_msda_element(s, value, grids, weights, index);
}
"""


def test_cuda_kernel_body_equals_grid_sample_sum(tmp_path: Path) -> None:
    """msda_element.h is what each CUDA thread runs; here it runs on the CPU against PyTorch."""
    import ctypes
    import subprocess

    source = tmp_path / "harness.cc"
    source.write_text(ELEMENT_HARNESS)
    library = tmp_path / "harness.so"
    subprocess.run(["c++", "-O1", "-shared", "-fPIC", f"-I{build.HERE}", str(source), "-o", str(library)], check=True)

    class Shape(ctypes.Structure):  # msda.h's SaaMsdaShape
        _fields_ = [(name, ctypes.c_int64) for name in ("batch", "positions", "heads", "channels", "queries", "levels",
                                                         "points")] + [(name, ctypes.c_int64 * 8) for name in
                                                                       ("height", "width", "start")]

    for feeds in (op_feeds(channels=32), op_feeds(channels=5), nan_feeds()):
        channels = feeds["value"].shape[3]
        batch, positions, heads, _ = feeds["value"].shape
        _, queries, _, levels, points, _ = feeds["grids"].shape
        shape = Shape(batch, positions, heads, channels, queries, levels, points)
        start = 0
        for level, (height, width) in enumerate(LEVELS):
            shape.height[level], shape.width[level], shape.start[level] = height, width, start
            start += height * width
        out = np.zeros((batch, queries, heads * channels), np.float32)
        pointer = ctypes.POINTER(ctypes.c_float)
        ctypes.CDLL(str(library)).msda_all(ctypes.byref(shape), *(np.ascontiguousarray(feeds[n]).ctypes.data_as(pointer)
                                                                   for n in ("value", "grids", "weights")),
                                           out.ctypes.data_as(pointer))
        np.testing.assert_allclose(out, torch_sum(feeds), atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(build.nvcc_path() is None, reason="nvcc is not installed")
def test_cuda_library_compiles_and_registers_beside_the_cpu_kernel(tmp_path: Path) -> None:
    """nvcc builds the CPU + CUDA library; without a GPU its CPU kernel still serves the CPU provider."""
    library = build.build_cuda(tmp_path / "libsaa_ops_cuda.so", archs=("90",))
    feeds = op_feeds()
    np.testing.assert_allclose(op_session(library).run(["out"], feeds)[0], torch_sum(feeds), atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_op_equals_the_cpu_op(cpu_library: Path) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not ops.CUDA_LIBRARY.is_file():
        pytest.skip("needs onnxruntime-gpu and libsaa_ops_cuda.so (python -m runtime.ops.build --cuda)")
    feeds = op_feeds(batch=2, queries=513, heads=8, channels=32)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ops.CUDA_LIBRARY))
    session = ort.InferenceSession(op_model(), options, providers=["CUDAExecutionProvider"])
    got = session.run(["out"], feeds)[0]
    np.testing.assert_allclose(got, op_session(cpu_library).run(["out"], feeds)[0], atol=2e-5, rtol=1e-5)


# --- the deformable attention traced with the op ---------------------------------------------------------------


ATTENTION_LEVELS = ((12, 10), (6, 5), (3, 3), (2, 2))  # GroundingDINO's 4 feature levels


def _attention_case(reference_dims: int, levels=ATTENTION_LEVELS, batch: int = 2):
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoMultiscaleDeformableAttention

    from export.gdino import grounding_dino_config

    torch.manual_seed(0)
    config = grounding_dino_config("tiny")
    attention = GroundingDinoMultiscaleDeformableAttention(config, num_heads=config.encoder_attention_heads,
                                                           n_points=config.encoder_n_points).eval()
    with torch.no_grad():
        attention.sampling_offsets.weight.normal_(0, 0.05)
        attention.sampling_offsets.bias.normal_(0, 2)
    shapes = torch.tensor(levels)
    positions = sum(h * w for h, w in levels)
    queries = positions if reference_dims == 2 else 17
    rng = np.random.default_rng(1)
    feeds = {
        "hidden": rng.standard_normal((batch, queries, config.d_model), dtype=np.float32),
        "memory": rng.standard_normal((batch, positions, config.d_model), dtype=np.float32),
        "mask": rng.random((batch, positions)) > 0.2,
        "references": rng.random((batch, queries, len(levels), reference_dims), dtype=np.float32) * 0.9,
    }
    start = torch.cat([torch.zeros(1, dtype=torch.long), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])

    def run(hidden, memory, mask, references):
        return attention(hidden_states=hidden, attention_mask=mask, encoder_hidden_states=memory, position_embeddings=None,
                         reference_points=references, spatial_shapes=shapes, spatial_shapes_list=list(levels),
                         level_start_index=start)[0]

    return run, attention, feeds


@pytest.mark.parametrize("reference_dims", [2, 4])  # the encoder's points, the decoder's boxes
def test_fused_form_equals_transformers_module_in_onnxruntime(cpu_library: Path, tmp_path: Path,
                                                             reference_dims: int) -> None:
    from export.common import export_onnx, ort_session
    from export.gdino_forms import deformable_attention, trace_forms

    run, attention, feeds = _attention_case(reference_dims)
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    with torch.no_grad():
        expected = run(*args).numpy()

    class Fused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = attention  # a submodule: its weights are traced as initialisers

        def forward(self, *inputs):
            with trace_forms(self.attention), deformable_attention("fused"):
                return run(*inputs)

    with torch.no_grad():
        np.testing.assert_allclose(Fused()(*args).numpy(), expected, atol=1e-5)
    path = tmp_path / "fused.onnx"
    export_onnx(Fused(), args, path, list(feeds), ["out"])
    graph = path.read_bytes()
    assert b"MultiScaleDeformableAttention" in graph and b"GridSample" not in graph
    got = ort_session(path).run(["out"], feeds)[0]
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_deformable_attention_form_is_checked_and_restored() -> None:
    from export.gdino_forms import FoldedDeformableAttention, deformable_attention

    with pytest.raises(ValueError, match="standard"):
        with deformable_attention("grid"):
            pass
    with deformable_attention("fused"):
        assert FoldedDeformableAttention.WEIGHTED_SUM == "fused"
    assert FoldedDeformableAttention.WEIGHTED_SUM == "per_point"


def test_export_refuses_trt_with_the_fused_head(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from export.__main__ import main

    out = tmp_path / "engines"
    assert main(["--profile", "full", "--tiny", "--random-init", "--trt", "--deformable-attention", "fused",
                 "--out", str(out)]) == 2
    assert "TensorRT has no plugin" in capsys.readouterr().err and not out.exists()


def test_export_of_a_fused_head_without_the_library_says_what_to_build(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    from export.common import ExportError
    from export.gdino import export_grounding_dino

    monkeypatch.delenv("SAA_OPS_LIBRARY", raising=False)
    monkeypatch.setattr(C, "CPU_LIBRARY", tmp_path / "libsaa_ops.so")
    with pytest.raises(ExportError, match="python -m runtime.ops.build"):
        export_grounding_dino(None, tmp_path, (224, 224), tmp_path / "tokenizer.json", deformable_attention="fused")
    with pytest.raises(ExportError, match="must be one of"):
        export_grounding_dino(None, tmp_path, (224, 224), tmp_path / "tokenizer.json", deformable_attention="grid")


def test_export_default_is_the_fused_op_and_standard_with_trt() -> None:
    from argparse import Namespace

    from export.engine_dir import deformable_attention

    assert deformable_attention(Namespace(deformable_attention=None, trt=False)) == "fused"
    assert deformable_attention(Namespace(deformable_attention=None, trt=True)) == "standard"
    assert deformable_attention(Namespace(deformable_attention="standard", trt=False)) == "standard"


def test_describe_names_the_library_and_its_build(cpu_library: Path, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.delenv("SAA_OPS_LIBRARY", raising=False)
    assert C.describe("cpu") == f"saa.edge ops 1: CPU ({cpu_library})"
    monkeypatch.setattr(C, "CPU_LIBRARY", tmp_path / "libsaa_ops.so")
    assert C.describe("cpu") == "not built"


# --- the GPU kernel's check before a fused head runs on a GPU, and the fallback to the CPU build
# (runtime.engine.sessions.check_gpu_kernel) ----------------


class _FakeSession:
    """onnxruntime.InferenceSession stand-in: the 'GPU' session's output is off by `offset`."""

    offset = 0.5

    def __init__(self, graph, options, providers):
        self.gpu = providers != ["CPUExecutionProvider"]

    def run(self, names, feeds):
        out = np.ones((2, 50, 128), np.float32)
        return [out + self.offset if self.gpu else out]


@pytest.fixture
def cuda_build(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CUDA library chosen for GPUs, with the 'cuda' providers turned into the CPU provider."""
    if not ops.CUDA_LIBRARY.is_file():
        pytest.skip("libsaa_ops_cuda.so is not built (no nvcc)")
    import runtime.engine.sessions

    monkeypatch.delenv("SAA_OPS_LIBRARY", raising=False)
    # the 'GPU' list differs from the plain CPU list the check runs second (the fake session tells them apart)
    monkeypatch.setattr(runtime.engine.sessions, "providers_for", lambda *args, **kwargs: [("CPUExecutionProvider", {})])
    monkeypatch.setattr(C, "_gpu_checked", {})
    return ops.CUDA_LIBRARY


def test_gpu_check_runs_the_builtin_graph_through_both_kernels(cuda_build: Path) -> None:
    settings = EngineSettings(device="cuda")
    assert check_gpu_kernel(settings) == (settings, None)  # agreed: the settings as given, no note
    assert C._gpu_checked == {str(cuda_build): 0.0}  # both runs on the CPU kernel here: equal to the bit; once per library
    assert check_gpu_kernel(EngineSettings()) == (EngineSettings(), None)  # no GPU: nothing checked


def test_a_gpu_kernel_that_disagrees_makes_the_engines_take_the_cpu_build(cuda_build: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    settings = EngineSettings(device="cuda", cuda_graphs=True)
    with pytest.warns(UserWarning, match=r"CUDA kernel .* disagrees with its CPU kernel by 0.5 .*runs on the CPU instead"):
        checked, note = check_gpu_kernel(settings)
    assert checked == settings.with_changes(ops_library=str(ops.CPU_LIBRARY))  # every other switch kept
    assert "by 0.5" in note and f"ops_library={ops.CPU_LIBRARY}" in note and "\n" not in note
    with pytest.raises(EngineError, match="disagrees"):  # the check itself still says what it found
        C.check_gpu_kernel("cuda", lambda: b"", lambda: [("CPUExecutionProvider", {})])
    monkeypatch.setattr(_FakeSession, "offset", 1e-6)  # within the tolerance: no fallback
    monkeypatch.setattr(C, "_gpu_checked", {})
    assert check_gpu_kernel(settings) == (settings, None)
    assert C._gpu_checked[str(cuda_build)] == pytest.approx(1e-6, rel=0.2)


def test_a_gpu_kernel_that_fails_makes_the_engines_take_the_cpu_build(cuda_build: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    class Failing(_FakeSession):
        def run(self, names, feeds):
            if self.gpu:
                raise RuntimeError("CUDA failure 209: no kernel image is available for execution on the device\ndetails")
            return super().run(names, feeds)

    monkeypatch.setattr(ort, "InferenceSession", Failing)
    with pytest.warns(UserWarning, match="its CUDA kernel failed on the check graph .*no kernel image"):
        checked, note = check_gpu_kernel(EngineSettings(device="cuda"))
    assert checked.ops_library == str(ops.CPU_LIBRARY) and "details" not in note


def test_without_a_cpu_build_a_wrong_gpu_kernel_stops(cuda_build: Path, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    monkeypatch.setattr(ops, "CPU_LIBRARY", tmp_path / "libsaa_ops.so")
    with pytest.raises(EngineError, match="disagrees .* the CPU build .* is missing"):
        check_gpu_kernel(EngineSettings(device="cuda"))


def test_gpu_check_skips_a_library_without_cuda(cpu_library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = EngineSettings(device="cuda", ops_library=str(cpu_library))
    assert check_gpu_kernel(settings) == (settings, None)


def test_pipeline_checks_the_gpu_kernel_for_a_fused_head_only(full_tiny_engine_dir, full_tiny_standard_engine_dir,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime import manifest as mf
    from runtime.config import load_shipped_config
    from runtime.pipeline import Pipeline

    calls = []
    monkeypatch.setattr("runtime.pipeline.check_gpu_kernel", lambda settings: calls.append(settings) or (settings, None))
    config = load_shipped_config("mvtec", "bottle")
    Pipeline(mf.load_manifest(full_tiny_standard_engine_dir), config)
    assert calls == []
    pipeline = Pipeline(mf.load_manifest(full_tiny_engine_dir), config)
    assert [settings.device for settings in calls] == ["cpu"] and pipeline.ops_fallback is None


def test_a_pipeline_whose_gpu_kernel_is_wrong_runs_the_op_on_the_cpu(full_tiny_engine_dir, cpu_library: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The check's verdict (faked: no GPU here) makes the pipeline reopen its session factory with
    the CPU build: a warning, a note for results files, and the same maps as before."""
    import runtime.pipeline
    from runtime import manifest as mf
    from runtime.config import load_shipped_config
    from runtime.image_io import read_image

    def disagreeing(device, graph, cuda_providers, library=None):
        raise EngineError(f"{ops.DEFORMABLE_OP}: the CUDA kernel in {ops.CUDA_LIBRARY} disagrees with its CPU "
                          f"kernel by 0.5 (tolerance {C.CHECK_TOLERANCE})")

    manifest, config = mf.load_manifest(full_tiny_engine_dir), load_shipped_config("mvtec", "bottle")
    image = read_image(Path(__file__).resolve().parent / "data" / "bottle_demo.png")
    expected = runtime.pipeline.Pipeline(manifest, config, threads=1)(image)
    factories = []
    real_factory = runtime.pipeline.SessionFactory
    monkeypatch.setattr(runtime.pipeline, "SessionFactory", lambda settings: factories.append(settings) or real_factory(settings))
    monkeypatch.setattr(C, "check_gpu_kernel", disagreeing)
    with pytest.warns(UserWarning, match=r"disagrees with its CPU kernel by 0.5 \(tolerance .*\): the op runs on the CPU instead"):
        pipeline = runtime.pipeline.Pipeline(manifest, config, threads=1)
    assert "by 0.5" in pipeline.ops_fallback and pipeline.settings.ops_library == str(ops.CPU_LIBRARY)
    assert [f.ops_library for f in factories] == [None, str(ops.CPU_LIBRARY)]  # the engines' factory, remade
    got = pipeline(image)
    assert [r.box for r in got.regions] == [r.box for r in expected.regions]
    np.testing.assert_array_equal(got.anomaly_map, expected.anomaly_map)


def test_a_broken_library_is_named_with_the_engine_it_stopped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from runtime.engine.sessions import session_factory

    path = tmp_path / "msda.onnx"
    path.write_bytes(op_model())
    broken = tmp_path / "libsaa_ops.so"
    broken.write_bytes(b"not a library")
    with pytest.raises(EngineError, match=rf"{path}: cannot load engine: cannot load the custom-op library"):
        session_factory(EngineSettings(ops_library=str(broken)))(path)


def test_sessions_opened_from_several_threads_share_the_registration(cpu_library: Path) -> None:
    """The library makes its op domain once per process (one per registration was never freed);
    every session registered from any thread still gets the op."""
    import threading

    feeds = op_feeds(queries=7)
    expected = torch_sum(feeds)
    failures = []

    def open_and_run() -> None:
        try:
            for _ in range(5):
                got = op_session(cpu_library, threads=1).run(["out"], feeds)[0]
                np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
        except Exception as err:  # reported below: an assert in a thread would not fail the test
            failures.append(err)

    workers = [threading.Thread(target=open_and_run) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert failures == []
