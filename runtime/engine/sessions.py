"""onnxruntime sessions for the engines, on the device and with the switches of one EngineSettings.

    make_session = session_factory(EngineSettings(device="cuda"))
    session = make_session(engine_dir / "sam_encoder.onnx")

CPU: worker threads block instead of spinning between runs; the numba kernels that follow
a CNN run need those cores (measured on 2 cores: the saliency step ~1.8x faster).
CUDA: the CUDA execution provider; `runners.DeviceRunner` adds IO binding so one graph's
outputs stay on the GPU for the next graph (SAM embedding -> decoder) and, for graphs whose
input shapes never change, CUDA graphs. TensorRT: onnxruntime's TensorRT execution provider in
fp16 with its engine and timing caches inside the engines dir (`trt_cache/`), unverified.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import onnxruntime as ort

from ..errors import EngineError, engine_failure
from ..settings import DEVICES, EngineSettings
from . import custom_ops

TRT_CACHE_DIR = "trt_cache"  # inside the engines dir: TensorRT plans are tied to the GPU and TensorRT version


def _require(provider: str, device: str, hint: str) -> None:
    available = ort.get_available_providers()
    if provider not in available:
        raise EngineError(
            f"device {device!r} asked for, but this onnxruntime has no {provider} "
            f"(available: {', '.join(available)}): {hint}"
        )


TF32_GRAPHS = {"head": ("gdino_head",)}  # cuda_tf32=head: TF32 where the fp32 FLOPs are, nowhere else


def cuda_options(settings: EngineSettings | None = None, graph: str | None = None,
                 cuda_graph: bool = False) -> dict[str, str]:
    """onnxruntime CUDA provider options for the graph named `graph` (its file stem, None for
    one of the runtime's own), from the settings' cudnn_search and cuda_tf32."""
    settings = (settings or EngineSettings()).resolved()
    # EXHAUSTIVE times every algorithm on the first run
    options = {"cudnn_conv_algo_search": settings.cudnn_search, "do_copy_in_default_stream": "1"}
    # onnxruntime's CUDA provider runs fp32 MatMul/Conv in TF32 unless told not to (measured on an
    # H200: 2.8e-4 relative error on a 2048^3 MatMul, and the tiny pipeline then kept 53 of the CPU's
    # 59 regions; bench/results/tf32_check_cuda-h200_2026-11-26.json). The reference's torch keeps
    # fp32 matmuls in fp32, so we do too; cuda_tf32=on trades that fidelity for speed everywhere,
    # cuda_tf32=head only in GroundingDINO's fp32 head (1246 of the fp32 GFLOP per image; the
    # kNN graph, whose top-n selection TF32 moved, stays exact).
    tf32 = settings.cuda_tf32
    options["use_tf32"] = "1" if tf32 == "on" or graph in TF32_GRAPHS.get(tf32, ()) else "0"
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return options


def providers_for(device: str, cache_dir: Path | None = None, cuda_graph: bool = False,
                  graph: str | None = None, settings: EngineSettings | None = None) -> list:
    """The execution providers (with options) for a device name; EngineError naming what is missing.
    graph: the graph's name (file stem), for switches that apply to some graphs only."""
    if device not in DEVICES:
        raise EngineError(f"unknown device {device!r} (expected one of {', '.join(DEVICES)})")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    cuda = cuda_options(settings, graph, cuda_graph)
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


def _profile_if_asked(options: ort.SessionOptions, name: str, folder: str | None) -> None:
    """onnxruntime's profiler (per node: time, provider) when EngineSettings.ort_profile names a
    folder (bench/gpu/profile_graphs.py sets it and summarises the files)."""
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / name)


class SessionFactory:
    """Makes one InferenceSession per engine file, all with one EngineSettings.

        make_session = SessionFactory(EngineSettings(device="cuda"))
        session = make_session(engine_dir / "sam_encoder.onnx")

    spinning: let idle onnxruntime workers spin (lower latency when nothing else needs the
    cores; off by default, see the module doc). cuda_graph: capture CUDA graphs; only for
    graphs with fixed input shapes run through `DeviceRunner` (onnxruntime's requirement).
    """

    fixes_dims = True  # callers check before passing fixed_dims (a test's stand-in factory cannot)

    def __init__(self, settings: EngineSettings | None = None, spinning: bool = False,
                 cuda_graph: bool = False) -> None:
        self.settings = (settings or EngineSettings()).resolved()
        self.spinning = spinning
        self.cuda_graph = cuda_graph
        providers_for(self.settings.device, settings=self.settings)  # fail before any file is read

    @property
    def device(self) -> str:
        return self.settings.device

    def __call__(self, path: Path, fixed_dims: Mapping[str, int] | None = None,
                 cuda_graphs: bool | None = None) -> ort.InferenceSession:
        """fixed_dims: values for the graph's named (dynamic) dimensions. onnxruntime then knows
        every shape when it optimises, folds the shape arithmetic away (GroundingDINO's head:
        3093 -> 2428 nodes, no Shape node left) and runs no shape node on the CPU between GPU ones.
        cuda_graphs: this session captures CUDA graphs (None: the factory's cuda_graph); run it
        through DeviceRunner(static=True). onnxruntime refuses it for graphs with CPU nodes."""
        path = Path(path)
        settings, device = self.settings, self.settings.device
        graphs = self.cuda_graph if cuda_graphs is None else cuda_graphs
        providers = providers_for(device, path.parent / TRT_CACHE_DIR, graphs, graph=path.stem, settings=settings)
        try:
            options = session_options(settings.threads, self.spinning)
            if device == "cpu":
                _use_shared_cpu_arena(options)
            for name, value in (fixed_dims or {}).items():
                options.add_free_dimension_override_by_name(name, int(value))
            _profile_if_asked(options, path.stem, settings.ort_profile)
            custom_ops.register(options, device, settings.ops_library)  # for heads exported with the saa.edge ops
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises several private exception types
            missing_op = custom_ops.explain_missing(str(err), device)
            if missing_op:
                raise EngineError(f"{path}: cannot load engine: {missing_op}") from None
            raise engine_failure(f"{path}: cannot load engine", err) from None

    def builtin(self, name: str, device: str | None = None) -> ort.InferenceSession:
        """One of the runtime's built-in graphs on `device` (default: the factory's), same settings."""
        return builtin_graph_session(name, device or self.settings.device, self.settings)


def session_factory(settings: EngineSettings | None = None, spinning: bool = False,
                    cuda_graph: bool = False) -> SessionFactory:
    """SessionFactory(settings, ...): the engines' sessions with shared settings."""
    return SessionFactory(settings, spinning, cuda_graph)


GRAPH_DIR = Path(__file__).resolve().parents[1] / "data" / "graphs"  # built by export/builtin_graphs.py


def builtin_graph(name: str) -> bytes:
    """The bytes of one of the runtime's small built-in graphs (runtime/data/graphs/<name>.onnx)."""
    path = GRAPH_DIR / f"{name}.onnx"
    try:
        return path.read_bytes()
    except OSError as err:
        raise EngineError(f"built-in graph {name!r} is missing from this installation ({path}: {err.strerror}); "
                          "reinstall saa-edge, or run python -m export.builtin_graphs in a checkout") from None


def builtin_graph_session(name: str, device: str, settings: EngineSettings | None = None) -> ort.InferenceSession:
    """A session of one of the runtime's built-in graphs (kNN, mask upscaling, fusion) on `device`."""
    settings = settings or EngineSettings()
    options = session_options()
    _profile_if_asked(options, name, settings.ort_profile)
    return ort.InferenceSession(builtin_graph(name), options,
                                providers=providers_for(device, settings=settings))


def check_gpu_kernel(settings: EngineSettings) -> tuple[EngineSettings, str | None]:
    """Before a fused head runs on a GPU: custom_ops.check_gpu_kernel on the built-in msda_check graph
    (once per process and library). Returns the settings to open the engines with and a note: where
    the CUDA kernel agrees with the CPU kernel (or none is in use), `settings` itself and None; where
    it disagrees or fails, `settings` with ops_library set to the CPU build (the op then runs on the
    CPU between the GPU nodes: right, but slower, and the head captures no CUDA graph) and a one-line
    note, also warned, naming the difference and the fallback. EngineError only where no CPU build
    is there to fall back to."""
    import warnings

    from ..ops import CPU_LIBRARY

    try:
        custom_ops.check_gpu_kernel(settings.device, lambda: builtin_graph("msda_check"),
                                    lambda: providers_for("cuda", settings=settings), settings.ops_library)
    except EngineError as err:
        if not CPU_LIBRARY.is_file():
            raise EngineError(f"{err}, and the CPU build {CPU_LIBRARY} to run it on instead is missing: build it "
                              "with python -m runtime.ops.build, or export with --deformable-attention standard") from None
        note = (f"{err}: the op runs on the CPU instead (ops_library={CPU_LIBRARY}; slower, and the head captures "
                "no CUDA graph; export with --deformable-attention standard for a head in plain ONNX ops), "
                "please report this")
        warnings.warn(note, stacklevel=3)
        return settings.with_changes(ops_library=str(CPU_LIBRARY)), note
    return settings, None
