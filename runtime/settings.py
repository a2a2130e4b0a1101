"""EngineSettings: how the engines run (device, threads and every speed switch), in one object.

    settings = EngineSettings.from_environment(device="cuda", cuda_graphs=True)
    pipeline = Pipeline.open("engines/", dataset="mvtec", category="bottle", settings=settings)

The CLI (`--device`, `--cuda-graphs`, ...), the Python API (`Pipeline.open(..., settings=...)` or
its keywords) and the C ABI (`saa_open_options.settings`, "key=value,...") all build one. A value
given there wins; a field left unset takes its SAA_* environment variable where it has one (so a
switch can be flipped for a process without touching its command), then its default.
`EngineSettings(...)` built directly reads no environment. docs/configuration.md lists the fields.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from .errors import ConfigError

DEVICES = ("cpu", "cuda", "tensorrt")
TF32_MODES = ("off", "on", "head")
CUDNN_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
GEMM_BACKENDS = ("onnxruntime", "numpy")
MAX_THREADS = 1024  # onnxruntime starts them all at once: a typo (100000) would hang the process
_BOOL_WORDS = {"1": True, "on": True, "true": True, "yes": True, "0": False, "off": False, "false": False, "no": False}


def _switch(env: str | None, help: str, choices: tuple[str, ...] = ()) -> Any:
    return field(default=None, metadata={"env": env, "help": help, "choices": choices})


@dataclass(frozen=True)
class EngineSettings:
    """Every field but device and threads may be None: decided by the device (see `resolved`)."""

    device: str = field(default="cpu", metadata={"env": None, "help": "where the engines run", "choices": DEVICES})
    threads: int = field(default=0, metadata={"env": None, "help": "CPU threads per engine (0: onnxruntime's default)",
                                              "choices": ()})
    io_binding: bool | None = _switch(
        None, "the GPU paths: tensors stay on the device between graphs, masks are scored and fused there, the kNN "
              "runs as a graph (default: on a GPU; on forces them on the CPU provider, for tests)")
    static_shapes: bool | None = _switch(
        "SAA_STATIC_SHAPES", "GroundingDINO's head and SAM's decoder opened with this config's shapes fixed "
                             "(default: on a GPU)")
    cuda_graphs: bool | None = _switch(
        "SAA_CUDA_GRAPHS", "capture CUDA graphs for the fixed-shape graphs (default: off; needs the GPU paths)")
    overlap: bool | None = _switch(
        "SAA_OVERLAP", "SAM's image encoding and the saliency run in a second thread while GroundingDINO's head "
                       "runs (default: off)")
    device_canvas: bool | None = _switch(
        "SAA_DEVICE_CANVAS", "resize and normalise the detector's and SAM's input images on the device "
                             "(default: off; needs the GPU paths)")
    cuda_tf32: str | None = _switch(
        "SAA_CUDA_TF32", "TF32 for fp32 matmuls on CUDA: off (the default: as the reference), on, or head "
                         "(GroundingDINO's fp32 head only)", TF32_MODES)
    cudnn_search: str | None = _switch(
        "SAA_CUDNN_SEARCH", "cuDNN's convolution algorithm search (default HEURISTIC; EXHAUSTIVE times each on "
                            "the first run)", CUDNN_SEARCHES)
    ort_profile: str | None = _switch(
        "SAA_ORT_PROFILE", "a folder: every session writes onnxruntime's per-node profile there")
    gemm_backend: str | None = _switch(
        "SAA_GEMM_BACKEND", "the CPU kNN's similarity products: onnxruntime (the default) or numpy (BLAS, "
                            "for comparisons)", GEMM_BACKENDS)
    ops_library: str | None = _switch(
        "SAA_OPS_LIBRARY", "the custom-op library to register instead of the built one (a .so path)")

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r} (expected one of {', '.join(DEVICES)})")
        threads = self.threads
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
            raise ConfigError(f"threads must be an integer from 0 (onnxruntime's default) to {MAX_THREADS}, "
                              f"got {threads!r}")
        for spec in fields(self):
            value, choices = getattr(self, spec.name), spec.metadata["choices"]
            if spec.name in ("device", "threads") or value is None:
                continue
            if spec.type.startswith("bool") and not isinstance(value, bool):
                raise ConfigError(f"setting {spec.name} must be true or false, got {value!r}")
            if choices and value not in choices:
                raise ConfigError(f"setting {spec.name}={value!r}: expected one of {', '.join(choices)}")
            if spec.type.startswith("str") and not (isinstance(value, str) and value):
                raise ConfigError(f"setting {spec.name} must be a non-empty string, got {value!r}")

    # ------------------------------------------------------------------ building one

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, **given: Any) -> "EngineSettings":
        """The given fields (None: not given), the rest from their SAA_* variables, then defaults.

        SAA_CUDA_GRAPHS applies with device cuda only, SAA_STATIC_SHAPES off the CPU only and
        SAA_DEVICE_CANVAS with the GPU paths only, so that a variable set for a GPU process leaves a
        CPU one as it was."""
        environ = os.environ if environ is None else environ
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown settings {unknown} (known: {', '.join(f.name for f in fields(cls))})")
        values = {name: value for name, value in given.items() if value is not None}
        device = values.get("device", "cpu")
        gpu_paths = device != "cpu" if values.get("io_binding") is None else values["io_binding"]
        for spec in fields(cls):
            variable = spec.metadata["env"]
            if spec.name in values or variable is None or not environ.get(variable):
                continue
            value = parse_value(spec.name, environ[variable], source=variable)
            if spec.name == "cuda_graphs" and not (device == "cuda" and gpu_paths):
                continue
            if spec.name == "static_shapes" and device == "cpu":
                continue
            if spec.name == "device_canvas" and not gpu_paths:
                continue
            values[spec.name] = value
        return cls(**values)

    @classmethod
    def parse(cls, text: str, environ: Mapping[str, str] | None = None, **given: Any) -> "EngineSettings":
        """From "key=value,key=value" (the C ABI's settings string; ";" separates too), over `given`."""
        parsed: dict[str, Any] = dict(given)
        for item in filter(None, (part.strip() for part in text.replace(";", ",").split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"setting {item!r}: expected key=value")
            parsed[key] = parse_value(key, value.strip(), source="setting")
        return cls.from_environment(environ, **parsed)

    def with_changes(self, **changes: Any) -> "EngineSettings":
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ConfigError(f"unknown settings {unknown} (known: {', '.join(f.name for f in fields(self))})")
        return replace(self, **changes)

    # ------------------------------------------------------------------ what they decide

    @property
    def gpu_paths(self) -> bool:
        """IO binding and the device-side stages: on a GPU unless io_binding says otherwise."""
        return self.device != "cpu" if self.io_binding is None else self.io_binding

    def resolved(self) -> "EngineSettings":
        """Every None decided for this device; ConfigError for a switch its device cannot take."""
        gpu_paths = self.gpu_paths
        if self.cuda_graphs and not gpu_paths:
            raise ConfigError("CUDA graphs need the GPU paths (IO binding): io_binding=False turned them off")
        if self.device_canvas and not gpu_paths:
            raise ConfigError("the device canvas needs the GPU paths (IO binding): io_binding=False turned them off")
        return replace(
            self,
            static_shapes=self.device != "cpu" if self.static_shapes is None else self.static_shapes,
            cuda_graphs=bool(self.cuda_graphs), overlap=bool(self.overlap), device_canvas=bool(self.device_canvas),
            cuda_tf32=self.cuda_tf32 or "off", cudnn_search=self.cudnn_search or "HEURISTIC",
            gemm_backend=self.gemm_backend or "onnxruntime")

    def to_json(self) -> dict[str, Any]:
        """Every field, for results files and the CLI's --print-settings."""
        return {spec.name: getattr(self, spec.name) for spec in fields(self)}


def parse_value(name: str, text: str, source: str) -> Any:
    """A field's value from text (an environment variable, a C ABI setting, a CLI flag)."""
    specs = {spec.name: spec for spec in fields(EngineSettings)}
    if name not in specs:
        raise ConfigError(f"{source}: unknown setting {name!r} (known: {', '.join(specs)})")
    kind = specs[name].type
    if name == "threads":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{source}: threads={text!r} is not an integer") from None
    if kind.startswith("bool"):
        word = text.strip().lower()
        if word not in _BOOL_WORDS:
            raise ConfigError(f"{source}: {name}={text!r}: expected 1/0, on/off or true/false")
        return _BOOL_WORDS[word]
    value = text.strip()
    if name == "cuda_tf32":  # the variable's 0/1
        value = {"0": "off", "1": "on"}.get(value, value)
    choices = specs[name].metadata["choices"]
    if choices and value not in choices:
        raise ConfigError(f"{source}: {name}={text!r}: expected one of {', '.join(choices)}")
    return value


def setting_fields() -> list[Any]:
    """The dataclass fields with their help, variable and choices (the CLI and the docs list them)."""
    return list(fields(EngineSettings))


def add_settings_arguments(parser: Any) -> None:
    """--device, --threads and a flag per switch (every runtime command takes them); a flag left out
    leaves its field to the environment and the default."""
    group = parser.add_argument_group("engine settings (docs/configuration.md; a flag left out: its SAA_* "
                                      "variable, else the default)")
    group.add_argument("--device", default="cpu", choices=list(DEVICES))
    group.add_argument("--threads", type=int, default=0, help="CPU threads per engine (0: onnxruntime's default)")
    for spec in setting_fields():
        if spec.name in ("device", "threads"):
            continue
        flag = "--" + spec.name.replace("_", "-")
        help_text = spec.metadata["help"] + (f"; {spec.metadata['env']}" if spec.metadata["env"] else "")
        help_text = help_text.replace("%", "%%")
        if spec.type.startswith("bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif spec.metadata["choices"]:
            group.add_argument(flag, choices=list(spec.metadata["choices"]), default=None, help=help_text)
        else:
            group.add_argument(flag, default=None, metavar=spec.name.split("_")[-1].upper(), help=help_text)


def settings_from_args(args: Any, environ: Mapping[str, str] | None = None) -> EngineSettings:
    """The EngineSettings of a command's parsed arguments (add_settings_arguments), over the environment."""
    return EngineSettings.from_environment(environ, **{spec.name: getattr(args, spec.name, None)
                                                       for spec in setting_fields()})


__all__ = ["DEVICES", "EngineSettings", "add_settings_arguments", "parse_value", "setting_fields",
           "settings_from_args"]
