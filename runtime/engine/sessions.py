"""onnxruntime sessions for the engines, on the device the user asked for.

    make_session = session_factory("cuda")          # or "cpu", "tensorrt"
    session = make_session(engine_dir / "sam_encoder.onnx")

CPU: worker threads block instead of spinning between runs; the numba kernels that follow
a CNN run need those cores (measured on 2 cores: the saliency step ~1.8x faster).
CUDA: the CUDA execution provider; `DeviceRunner` adds IO binding so one graph's outputs
stay on the GPU for the next graph (SAM embedding -> decoder) and, for graphs whose input
shapes never change, CUDA graphs. TensorRT: onnxruntime's TensorRT execution provider in
fp16 with its engine and timing caches inside the engines dir (`trt_cache/`).
The CUDA and TensorRT paths were written without a GPU in reach: unverified here.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from .. import ops
from ..errors import ConfigError, EngineError, engine_failure

DEVICES = ("cpu", "cuda", "tensorrt")
TRT_CACHE_DIR = "trt_cache"  # inside the engines dir: TensorRT plans are tied to the GPU and TensorRT version
SessionFactory = Callable[[Path], ort.InferenceSession]


class _EngineClock(threading.local):
    """Milliseconds this thread has spent inside onnxruntime: runs, and their copies to and from the device.

    The pipeline reads it around each stage, so a stage's time splits into the engines' share and
    the host work around them (AnomalyResult.engine_ms; bench.latency prints both). On a GPU a
    run returns once its results are ready, so the share includes the device's compute."""

    def __init__(self) -> None:
        self.ms = 0.0


ENGINE_CLOCK = _EngineClock()


@contextmanager
def engine_time() -> Iterator[None]:
    """Count the enclosed onnxruntime run(s) on ENGINE_CLOCK."""
    start = time.perf_counter()
    try:
        yield
    finally:
        ENGINE_CLOCK.ms += (time.perf_counter() - start) * 1000.0


def _require(provider: str, device: str, hint: str) -> None:
    available = ort.get_available_providers()
    if provider not in available:
        raise EngineError(
            f"device {device!r} asked for, but this onnxruntime has no {provider} "
            f"(available: {', '.join(available)}): {hint}"
        )


TF32_GRAPHS = {"head": ("gdino_head",)}  # SAA_CUDA_TF32=head: TF32 where the fp32 FLOPs are, nowhere else


def cuda_options(graph: str | None = None, cuda_graph: bool = False) -> dict[str, str]:
    """onnxruntime CUDA provider options for the graph named `graph` (its file stem, None for
    one of the runtime's own), from the SAA_CUDNN_SEARCH and SAA_CUDA_TF32 switches."""
    search = os.environ.get("SAA_CUDNN_SEARCH", "HEURISTIC")  # EXHAUSTIVE times every algorithm on the first run
    if search not in ("HEURISTIC", "EXHAUSTIVE", "DEFAULT"):
        raise EngineError(f"SAA_CUDNN_SEARCH={search!r}: expected HEURISTIC (the default), EXHAUSTIVE or DEFAULT")
    options = {"cudnn_conv_algo_search": search, "do_copy_in_default_stream": "1"}
    # onnxruntime's CUDA provider runs fp32 MatMul/Conv in TF32 unless told not to (measured on an
    # H200: 2.8e-4 relative error on a 2048^3 MatMul, and the tiny pipeline then kept 53 of the CPU's
    # 59 regions; bench/results/tf32_check_cuda-h200_2026-11-26.json). The reference's torch keeps
    # fp32 matmuls in fp32, so we do too; SAA_CUDA_TF32=1 trades that fidelity for speed everywhere,
    # SAA_CUDA_TF32=head only in GroundingDINO's fp32 head (1246 of the fp32 GFLOP per image; the
    # kNN graph, whose top-n selection TF32 moved, stays exact).
    tf32 = os.environ.get("SAA_CUDA_TF32", "0")
    if tf32 not in ("0", "1", *TF32_GRAPHS):
        raise EngineError(f"SAA_CUDA_TF32={tf32!r}: expected 0 (fp32 matmuls in full fp32, the default), "
                          "1 (TF32 allowed) or head (TF32 in GroundingDINO's head only)")
    options["use_tf32"] = "1" if tf32 == "1" or graph in TF32_GRAPHS.get(tf32, ()) else "0"
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return options


def providers_for(device: str, cache_dir: Path | None = None, cuda_graph: bool = False,
                  graph: str | None = None) -> list:
    """The execution providers (with options) for a device name; EngineError naming what is missing.
    graph: the graph's name (file stem), for switches that apply to some graphs only."""
    if device not in DEVICES:
        raise EngineError(f"unknown device {device!r} (expected one of {', '.join(DEVICES)})")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    cuda = cuda_options(graph, cuda_graph)
    if device == "cuda":
        _require("CUDAExecutionProvider", device, "install onnxruntime-gpu, or use --device cpu")
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    _require("TensorrtExecutionProvider", device,
             "install onnxruntime-gpu built with TensorRT and the TensorRT libraries (libnvinfer), or use --device cuda")
    trt_options: dict[str, Any] = {
        "trt_fp16_enable": "True", "trt_engine_cache_enable": "True", "trt_timing_cache_enable": "True",
    }
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        trt_options.update(trt_engine_cache_path=str(cache_dir), trt_timing_cache_path=str(cache_dir))
    # Nodes TensorRT rejects fall back to CUDA, then CPU.
    return [("TensorrtExecutionProvider", trt_options), ("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


def worker_affinities(threads: int, cpus: set[int] | None = None) -> str | None:
    """onnxruntime's intra_op_thread_affinities value for `threads` threads, or None.

    onnxruntime pins its workers itself only when it picks the thread count. Given a count,
    it leaves them to the OS, and on the 2-vCPU machines measured here Linux then kept waking
    the worker on the calling thread's CPU after the cores had been idle or busy with another
    process: the saliency CNN took 11-13 ms instead of 7-9 ms after a 0.3-0.6 s pause, and the
    kNN's panel products 40-44 ms instead of 18-19 ms after the reference had run (slower
    than one thread). So when the count equals the CPUs this thread may use, the threads - 1
    workers are pinned one per CPU, to the last of them (onnxruntime numbers CPUs from 1);
    the calling thread, which takes a share of every product, stays free. With fewer threads
    than CPUs nothing is pinned: processes sharing a machine would all pin the same CPUs.
    None also for one thread and where there is no affinity API (not Linux)."""
    if cpus is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        cpus = os.sched_getaffinity(0)
    if threads < 2 or len(cpus) != threads:
        return None
    return ";".join(str(cpu + 1) for cpu in sorted(cpus)[1:])


def session_options(threads: int = 0, spinning: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        affinities = worker_affinities(int(threads))
        if affinities:
            options.add_session_config_entry("session.intra_op_thread_affinities", affinities)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


_shared_cpu_arena = False


def _use_shared_cpu_arena(options: ort.SessionOptions) -> None:
    """Make a CPU session allocate from one arena shared by all the process's CPU sessions.

    Each session's own arena keeps its peak for good; shared, the peaks of graphs that never
    run at once overlap (full-size ViT-B pipeline on CPU: peak RSS 11.4 GB -> 8.0 GB, same
    speed). Chunks are grown as requested, not to the next power of two (less held unused)."""
    global _shared_cpu_arena
    if not _shared_cpu_arena:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
        except Exception:  # already registered in this process (by another copy of this module, say)
            pass
        _shared_cpu_arena = True
    options.add_session_config_entry("session.use_env_allocators", "1")


PROFILE_ENV = "SAA_ORT_PROFILE"  # a folder: every session writes onnxruntime's per-node profile there


def _profile_if_asked(options: ort.SessionOptions, name: str) -> None:
    """onnxruntime's profiler (per node: time, provider) when SAA_ORT_PROFILE names a folder
    (bench/device/profile_graphs.py sets it and summarises the files)."""
    folder = os.environ.get(PROFILE_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / name)


MAX_THREADS = 1024  # onnxruntime starts them all at once: a typo (100000) would hang the process


def check_threads(threads: Any) -> int:
    """threads per engine: 0 (onnxruntime's default) up to MAX_THREADS; ConfigError otherwise."""
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 0 <= threads <= MAX_THREADS:
        raise ConfigError(f"threads must be an integer from 0 (onnxruntime's default) to {MAX_THREADS}, got {threads!r}")
    return int(threads)


def session_factory(device: str = "cpu", threads: int = 0, spinning: bool = False,
                    cuda_graph: bool = False) -> SessionFactory:
    """A function making one InferenceSession per engine file with shared settings.

    spinning: let idle onnxruntime workers spin (lower latency when nothing else needs the
    cores; off by default, see the module doc). cuda_graph: capture CUDA graphs; only for
    graphs with fixed input shapes run through `DeviceRunner` (onnxruntime's requirement).
    """
    providers_for(device)  # fail before any file is read
    check_threads(threads)

    def make_session(path: Path, fixed_dims: Mapping[str, int] | None = None,
                     cuda_graphs: bool | None = None) -> ort.InferenceSession:
        """fixed_dims: values for the graph's named (dynamic) dimensions. onnxruntime then knows
        every shape when it optimises, folds the shape arithmetic away (GroundingDINO's head:
        3093 -> 2428 nodes, no Shape node left) and runs no shape node on the CPU between GPU ones.
        cuda_graphs: this session captures CUDA graphs (None: the factory's cuda_graph); run it
        through DeviceRunner(static=True). onnxruntime refuses it for graphs with CPU nodes."""
        path = Path(path)
        graphs = cuda_graph if cuda_graphs is None else cuda_graphs
        providers = providers_for(device, path.parent / TRT_CACHE_DIR, graphs, graph=path.stem)
        try:
            options = session_options(threads, spinning)
            if device == "cpu":
                _use_shared_cpu_arena(options)
            for name, value in (fixed_dims or {}).items():
                options.add_free_dimension_override_by_name(name, int(value))
            _profile_if_asked(options, path.stem)
            ops.register(options, device)  # the saa.edge custom ops, for heads exported with them
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises several private exception types
            missing_op = ops.explain_missing(str(err), device)
            if missing_op:
                raise EngineError(f"{path}: cannot load engine: {missing_op}") from None
            raise engine_failure(f"{path}: cannot load engine", err) from None

    make_session.fixes_dims = True  # type: ignore[attr-defined]  # callers check before passing fixed_dims
    return make_session


def open_session(make_session: Callable[..., Any], path: Path, fixed_dims: Mapping[str, int] | None = None,
                 cuda_graphs: bool = False) -> tuple[Any, str | None]:
    """A session of `path` from `make_session`, and its CUDA-graph status: None where none was
    asked for (or the factory cannot make one: a test's stand-in), "captured", or onnxruntime's
    reason for refusing (a node on the CPU, a dynamic shape), in which case the session is a plain
    one. Run a capturing session with runner_for(..., static=True)."""
    fixed = {"fixed_dims": fixed_dims} if fixed_dims else {}
    if not (cuda_graphs and getattr(make_session, "fixes_dims", False)):
        return make_session(path, **fixed), None
    try:
        return make_session(path, cuda_graphs=True, **fixed), "captured"
    except EngineError as err:
        return make_session(path, cuda_graphs=False, **fixed), str(err)


def named_dims(inputs: Iterable[Any], feeds: Mapping[str, Any]) -> dict[str, int]:
    """The sizes `feeds` give the named dimensions of `inputs` (a session's get_inputs() or the
    manifest's Manifest.inputs: anything with .name and .shape), e.g. {"prompts": 6, "tokens": 12};
    EngineError when two inputs disagree on one."""
    dims: dict[str, int] = {}
    for spec in inputs:
        value = feeds.get(spec.name)
        if value is None:
            continue
        shape = value.shape() if callable(getattr(value, "shape", None)) else np.shape(value)
        for name, size in zip(spec.shape, shape):
            if isinstance(name, str):
                if dims.setdefault(name, int(size)) != int(size):
                    raise EngineError(f"inputs disagree on dimension {name!r}: {dims[name]} and {size}")
    return dims


GRAPH_DIR = Path(__file__).resolve().parents[1] / "data" / "graphs"  # built by export/builtin_graphs.py


def builtin_graph(name: str) -> bytes:
    """The bytes of one of the runtime's small built-in graphs (runtime/data/graphs/<name>.onnx)."""
    path = GRAPH_DIR / f"{name}.onnx"
    try:
        return path.read_bytes()
    except OSError as err:
        raise EngineError(f"built-in graph {name!r} is missing from this installation ({path}: {err.strerror}); "
                          "reinstall saa-edge, or run python -m export.builtin_graphs in a checkout") from None


def builtin_graph_session(name: str, device: str) -> ort.InferenceSession:
    """A session of one of the runtime's built-in graphs (kNN, mask upscaling, fusion) on `device`."""
    options = session_options()
    _profile_if_asked(options, name)
    return ort.InferenceSession(builtin_graph(name), options, providers=providers_for(device))


def session_device(session: ort.InferenceSession) -> str:
    """Where a session's tensors live for IO binding: 'cuda' when a GPU provider runs it, else 'cpu'."""
    gpu = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
    return "cuda" if gpu & set(session.get_providers()) else "cpu"


class DeviceRunner:
    """session.run with IO binding: inputs may be numpy arrays or OrtValues already on the device,
    and outputs named in `keep` come back as OrtValues left on the device (no copy to the host).

        encoder, decoder = DeviceRunner(enc_session), DeviceRunner(dec_session)
        (embedding,) = encoder.run(["image_embeddings"], {"image": pixels}, keep=("image_embeddings",))
        masks, iou = decoder.run(["low_res_masks", "iou_predictions"], {"image_embeddings": embedding, "boxes": boxes})

    static=True (for CUDA graphs, which replay fixed shapes at fixed addresses): every input
    and output stays bound to one buffer on the device from the first call on. numpy inputs are
    copied into the held buffers; an OrtValue input must be the same buffer each call (the
    held output of a static upstream graph); kept outputs come back as the same OrtValue each
    call, so read them before the next run. On CPU it behaves as session.run (tested); CUDA
    graph capture itself is unverified here.
    """

    def __init__(self, session: ort.InferenceSession, static: bool = False) -> None:
        self.session = session
        self.device = session_device(session)
        self.static = static
        self._binding = session.io_binding()
        self._inputs: dict[str, ort.OrtValue] = {}
        self._outputs: dict[str, ort.OrtValue] = {}  # static: held after the first run

    def _bind_input(self, name: str, value: Any) -> None:
        if isinstance(value, ort.OrtValue):
            if self.static:
                held = self._inputs.setdefault(name, value)
                if held.data_ptr() != value.data_ptr():
                    raise EngineError(f"{name}: a different device buffer from the first call's "
                                      "(CUDA graphs replay fixed addresses: the upstream graph must be static too)")
            self._binding.bind_ortvalue_input(name, value)
            return
        array = np.ascontiguousarray(value)
        if not self.static:
            if self.device == "cpu":
                self._binding.bind_cpu_input(name, array)  # holds the array until the next binding
            else:
                self._inputs[name] = ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)  # kept alive until rebound
                self._binding.bind_ortvalue_input(name, self._inputs[name])
            return
        held = self._inputs.get(name)
        if held is None or tuple(held.shape()) != array.shape:
            if held is not None:
                raise EngineError(f"{name}: shape {array.shape} differs from the first call's {tuple(held.shape())} "
                                  "(CUDA graphs replay fixed shapes)")
            # On the CPU an OrtValue wraps the numpy memory: copy, or update_inplace would write into the caller's array.
            owned = array.copy() if self.device == "cpu" else array
            held = self._inputs[name] = ort.OrtValue.ortvalue_from_numpy(owned, self.device, 0)
            self._binding.bind_ortvalue_input(name, held)
        else:
            held.update_inplace(array)

    def _bind_outputs(self, output_names: Sequence[str], keep: Sequence[str]) -> None:
        if not self.static:
            for name in output_names:
                self._binding.bind_output(name, self.device if name in keep else "cpu")
        elif not self._outputs:  # first static run: onnxruntime allocates them on the device
            for name in output_names:
                self._binding.bind_output(name, self.device)
        elif list(self._outputs) != list(output_names):
            raise EngineError(f"outputs {list(output_names)} differ from the first call's {list(self._outputs)}")

    def run(self, output_names: Sequence[str], feeds: Mapping[str, Any], keep: Sequence[str] = ()) -> list[Any]:
        """Outputs in order: numpy arrays, or OrtValues on the device for names in `keep`."""
        # Binding copies host inputs to the device: onnxruntime's work, on the engine clock as in
        # PlainRunner (whose session.run copies them), so a stage's host share is host work only.
        with engine_time():
            for name, value in feeds.items():
                self._bind_input(name, value)
            self._bind_outputs(output_names, keep)
            try:
                self.session.run_with_iobinding(self._binding)
            except Exception as err:  # onnxruntime raises several private exception types
                raise engine_failure("run with IO binding failed", err) from None
            values = self._binding.get_outputs()
            if self.static and not self._outputs:  # hold them: later runs write into the same buffers
                self._outputs = dict(zip(output_names, values))
                self._binding.clear_binding_outputs()
                for name, value in self._outputs.items():
                    self._binding.bind_ortvalue_output(name, value)
                values = list(self._outputs.values())
            out = [value if name in keep else value.numpy() for name, value in zip(output_names, values)]
        if not self.static:
            self._binding.clear_binding_outputs()
            self._binding.clear_binding_inputs()
        return out


class PlainRunner:
    """session.run behind DeviceRunner's interface (keep is ignored: everything comes back as numpy).

    The CPU default: no binding bookkeeping, and it accepts any object with a run() method
    (tests pass stand-ins)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.device = "cpu"

    def run(self, output_names: Sequence[str], feeds: Mapping[str, Any], keep: Sequence[str] = ()) -> list[Any]:
        with engine_time():
            return self.session.run(list(output_names), dict(feeds))


def runner_for(session: Any, io_binding: bool | None = None, static: bool = False) -> DeviceRunner | PlainRunner:
    """How a stage runs its graph. io_binding None: IO binding where the session runs on a GPU
    (outputs named in `keep` stay there for the next graph), plain session.run on the CPU;
    True forces IO binding (tests check the GPU code path on the CPU provider).
    static: fixed buffers for CUDA graphs (DeviceRunner); only with IO binding."""
    if io_binding is None:
        io_binding = hasattr(session, "get_providers") and session_device(session) != "cpu"
    return DeviceRunner(session, static=static) if io_binding else PlainRunner(session)


def to_host(value: Any) -> np.ndarray:
    """A numpy array from a numpy array or an OrtValue (copied from the device if it lives there)."""
    return value.numpy() if isinstance(value, ort.OrtValue) else np.asarray(value)


__all__ = ["DEVICES", "DeviceRunner", "PlainRunner", "GRAPH_DIR", "builtin_graph", "builtin_graph_session", "runner_for", "to_host", "TRT_CACHE_DIR", "providers_for", "session_device", "session_factory", "session_options"]
