#!/usr/bin/env bash
# The prepared GPU check (one call, well under 10 minutes): parity on CUDA in f32 and bf16,
# then the released-size benchmark, writing JSON results into $OUT (or ./gpu-check-out).
#
# On the device machine, from the repository root, with dist/idiff-studio-cuda (or its .gz,
# which is what travels) built by scripts/build-cuda.sh and the fixtures under
# shared/fixtures or $IDIFF_FIXTURES:
#   bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-dist/idiff-studio-cuda}"
if [[ ! -x "$BIN" && -f "$BIN.gz" ]]; then
  gunzip -c "$BIN.gz" > "$BIN" && chmod +x "$BIN"
fi
OUT="${OUT:-gpu-check-out}"
FIX="${IDIFF_FIXTURES:-$( [ -d shared/fixtures ] && echo shared/fixtures || echo ../shared/fixtures )}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
status=0
"$BIN" parity --device cuda:0 --dtype f32 --fixtures "$FIX" --json "$OUT/parity_f32.json" || status=1
"$BIN" parity --device cuda:0 --dtype bf16 --fixtures "$FIX" --json "$OUT/parity_bf16.json" || true
for dt in f32 bf16; do
  timeout 240 "$BIN" bench --device cuda:0 --dtype "$dt" --configs released --batches 1,16,64 \
    --repeats 3 --ddim-steps 50 --ddim-images 50 --json "$OUT/bench_released_$dt.json" || status=1
done
timeout 120 "$BIN" bench --device cuda:0 --dtype f32 --configs released --batches 1 --repeats 1 \
  --ddim-steps 0 --ddpm-images 50 --json "$OUT/bench_ddpm.json" || true
# FR training throughput (iresnet50 at 112 px on ProcFace faces rendered on the fly).
timeout 120 "$BIN" train-fr --device cuda:0 --backbone iresnet50 --batch-size 128 \
  --bench-steps 20 --out "$OUT/train-fr-bench" > "$OUT/bench_train_fr.json" || true
exit $status
