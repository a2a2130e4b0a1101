"""How a stage runs its graph: plain session.run, or IO binding that keeps tensors on the device.

    encoder, decoder = runner_for(enc_session), runner_for(dec_session)
    (embedding,) = encoder.run(["image_embeddings"], {"image": pixels}, keep=("image_embeddings",))

Every run is counted on the engine clock (runtime.engine.clock), so a stage's time splits into
onnxruntime's share and the host work around it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from ..errors import EngineError, engine_failure
from .clock import engine_time


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
    graph capture ran in the H200 runs (bench/results/latency_cuda-h200_*: every fixed-shape graph "captured").
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
