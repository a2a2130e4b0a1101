#!/usr/bin/env bash
# Run ON the GPU machine (the `device` tool's `run`), from the repo root. One step per call
# (each call may run 10 minutes at most). docs/latency.md, "GPU session", gives the call order.
#
#   bench/device/run.sh part N                  keep the onnxruntime-gpu wheel part .whl/ort.part.0N (carry it)
#   bench/device/run.sh setup                   join and install onnxruntime-gpu and segment-anything into /tmp/site
#   bench/device/run.sh export VARIANT PREC     full-size random-weight engines into /tmp/engines-VARIANT-PREC
#   bench/device/run.sh latency VARIANT PREC [ITERS] [REF_ITERS]
#                                               bench.latency --device cuda --reference; JSON and log into $OUT
#
# Environment: SAA_DEVICE (default cuda; "cpu" rehearses the steps on a machine without a GPU),
# SAA_EXPORT_ARGS (extra export arguments, e.g. "--tiny --detector-size 224x224" for a rehearsal),
# ENGINES_ROOT (default /tmp), OUT (default ./device-out).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
SITE=/tmp/site
ENGINES_ROOT=${ENGINES_ROOT:-/tmp}
OUT=${OUT:-$PWD/device-out}
DEVICE=${SAA_DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/numba-cache}

step=${1:?"step: part N | setup | export VARIANT PREC | latency VARIANT PREC [ITERS] [REF_ITERS]"}
shift
case "$step" in
  part)
    mkdir -p /tmp/ortw && cp ".whl/ort.part.0${1:?part number}" /tmp/ortw/ && ls -la /tmp/ortw ;;
  setup)
    wheel=/tmp/ortw/onnxruntime_gpu-${ORT_GPU_VERSION:-1.31.1}-cp312-cp312-manylinux_2_28_x86_64.whl
    cat /tmp/ortw/ort.part.* > "$wheel"
    [ -f .whl/ort.sha256 ] && echo "$(cat .whl/ort.sha256)  $wheel" | sha256sum -c -
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel" .device/segment_anything-*.whl
    $PY -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader ;;
  export)
    variant=${1:?variant vit_b|vit_l|vit_h}; precision=${2:-fp32}
    dir="$ENGINES_ROOT/engines-$variant-$precision"
    set -o pipefail
    # shellcheck disable=SC2086  # SAA_EXPORT_ARGS is a list of words
    time $PY -m export --profile full --random-init --sam-variant "$variant" --precision "$precision" \
      --tokenizer-zip .device/tokenizer.zip --out "$dir" --force ${SAA_EXPORT_ARGS:-} 2>&1 | tee "$OUT/export-$variant-$precision.log"
    $PY -c "import json,sys; m=json.load(open(sys.argv[1])); [print(k, v.get('parity')) for k, v in m['models'].items()]" "$dir/manifest.json" \
      | tee -a "$OUT/export-$variant-$precision.log" ;;
  latency)
    variant=${1:?variant}; precision=${2:-fp32}; iters=${3:-50}; ref_iters=${4:-10}
    dir="$ENGINES_ROOT/engines-$variant-$precision"
    [ "$DEVICE" = cpu ] || $PY -c "import onnxruntime as o; o.preload_dlls()"
    set -o pipefail
    $PY -m bench.latency --engine-dir "$dir" --device "$DEVICE" --iters "$iters" --warmup 5 \
      --reference --reference-iters "$ref_iters" --out "$OUT/" 2>&1 | tee "$OUT/latency-$variant-$precision.log" ;;
  *)
    echo "unknown step $step" >&2; exit 2 ;;
esac
