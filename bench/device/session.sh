#!/usr/bin/env bash
# One call on the warm GPU machine, right after the wheel parts (docs/latency.md, "GPU session"):
# setup, full-size fp16 exports (ViT-B and ViT-H side by side), the gpu-marked tests on tiny
# engines, the TF32 check, then latency for each variant while the call's time allows.
# At most 8 files come back from $OUT: checks.log, export-*.log (2), latency-*.log (2), latency JSON (2).
#   bench/device/session.sh                # BUDGET_S (default 560), ITERS (50), REF_ITERS (10)
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
budget=${BUDGET_S:-560}
left() { echo $((budget - (SECONDS - start))); }
run=bench/device/run.sh
export OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
log=$OUT/checks.log
bash $run setup 2>&1 | tee -a "$log" || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba-cache
bash $run export vit_b fp16 >/dev/null 2>&1 & pid_b=$!
bash $run export vit_h fp16 >/dev/null 2>&1 & pid_h=$!
echo "== tiny engines ($(left) s left)" | tee -a "$log"
python3 -m export --profile full --tiny --random-init --detector-size 224x224 \
  --tokenizer-zip .device/tokenizer.zip --out /tmp/eng-tiny --force 2>&1 | tail -3 | tee -a "$log"
echo "== pytest -m gpu ($(left) s left)" | tee -a "$log"
SAA_TEST_FULL_TINY_ENGINES=/tmp/eng-tiny timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider \
  -o faulthandler_timeout=200 tests 2>&1 | tail -60 | tee -a "$log"
echo "== tf32 check ($(left) s left)" | tee -a "$log"
timeout 120 python3 -m bench.device.tf32_check /tmp/eng-tiny 2>&1 | tail -60 | tee -a "$log"
wait $pid_b; echo "== export vit_b exit $? ($(left) s left)" | tee -a "$log"
wait $pid_h; echo "== export vit_h exit $? ($(left) s left)" | tee -a "$log"
for variant in vit_b vit_h; do
  if [ "$(left)" -gt 120 ]; then
    echo "== latency $variant ($(left) s left)" | tee -a "$log"
    timeout $(( $(left) - 15 )) bash $run latency $variant fp16 "${ITERS:-50}" "${REF_ITERS:-10}" >/dev/null 2>&1
    echo "== latency $variant exit $? ($(left) s left)" | tee -a "$log"
  else
    echo "== latency $variant skipped: $(left) s left" | tee -a "$log"
  fi
done
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader | tee -a "$log"
