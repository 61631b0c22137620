#!/usr/bin/env bash
# The accelerator benchmark table of docs/scaling.md, in one run (< 8 min on one H200):
# small (110M) and llama_1b (1.04B), bf16, each attention kernel of the platform (xla and the
# fused one: cudnn on GPU, splash on TPU), remat variants; then the table.
#
#   scripts/bench_accel.sh [OUT_DIR]            # default runs/bench_accel
#   LM_BENCH_TINY=1 scripts/bench_accel.sh DIR  # the same runs at tiny sizes, on any CPU (tests)
#
# Each run is `python -m lm.bench ... --json=OUT_DIR/<run>.json` in its own process (so one
# out-of-memory run costs only itself, and is a row saying so). MFU is against the device-kind
# table's peak; peak_source also gives a bf16 matmul measured in the same run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench_accel}
PY=${PYTHON:-python}
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log

platform=$($PY -c 'import jax; print(jax.default_backend())')
case $platform in
  tpu) fused=(splash) ;;
  gpu) fused=(cudnn) ;;
  *) fused=(splash cudnn) ;;  # CPU: splash in interpret mode, cudnn falling back to xla.
esac

if [[ -n ${LM_BENCH_TINY:-} ]]; then
  size=(--config.model.d_model=64 --config.model.n_layers=2 --config.model.n_heads=2
        --config.model.n_kv_heads=1 --config.model.mlp_dim=128 --config.model.vocab_size=512
        --config.data.seq_len=128 --config.model.attn_query_chunk=64 --steps=1 --repeats=1)
  small_batch=2; llama_batch=2; per_run=300
else
  size=(); small_batch=32; llama_batch=8; per_run=150
fi

run() {  # run NAME CONFIG ARGS...
  local name=$1 config=$2; shift 2
  echo "== $name" >&2
  timeout "$per_run" $PY -m lm.bench --config="configs/$config.py" --json="$OUT/$name.json" \
    "$@" "${size[@]}" > "$OUT/$name.log" 2>&1 || echo "   failed: $(tail -n 1 "$OUT/$name.log")" >&2
}

for kernel in xla "${fused[@]}"; do
  for remat in save_matmuls none; do
    run "small_${kernel}_${remat}" small --config.data.batch_size=$small_batch \
      --config.model.attention=$kernel --config.model.remat=$remat --steps=10 --repeats=3
  done
  for remat in full save_matmuls; do
    run "llama_1b_${kernel}_${remat}" llama_1b --config.data.batch_size=$llama_batch \
      --config.model.attention=$kernel --config.model.attn_query_chunk=512 \
      --config.model.remat=$remat --steps=5 --repeats=3
  done
done
for kernel in "${fused[@]}"; do  # Without attention probabilities, remat none may now fit.
  run "llama_1b_${kernel}_none" llama_1b --config.data.batch_size=$llama_batch \
    --config.model.attention=$kernel --config.model.remat=none --steps=5 --repeats=3
done

$PY scripts/bench_table.py "$OUT"
