#!/usr/bin/env bash
# Device call (run with bench/make_device_data.sh done first; see docs/performance.md):
# call 3: each code version on the 64 x 1024 gpt_small step (v0: custom cross-entropy, bfloat16
# logits, unrolled layers; v1: + activation gradients that keep only their inputs; v2 = this tree:
# + one-pass online log-sum-exp), three XLA flags, the final gpt_small / llama_1b figures, the
# 200-step equivalence against the original code, and quality parity through the real loop.
# (As run on 2026-11-21 the v0, v1 and eq_original stages failed: they called a shell function
# through `timeout`; they are written here as bench/gpu_perf4_parity.sh runs them.)
set -u
source bench/gpu_common.sh
IN_DIR='cd "$0" && exec python3 -m llm_jax.bench "$@"'
GS64=(--config=configs/gpt_small.py --synthetic --config.train.global_batch_size=64
      --config.train.microbatches=1 --config.model.scan_unroll=12 --warmup=2 --steps=6)
stage v0 60 -- bash -c "$IN_DIR" .device_data/v0 "${GS64[@]}" --json=/tmp/bench/v0.json
stage v1 60 -- bash -c "$IN_DIR" .device_data/v1 "${GS64[@]}" --json=/tmp/bench/v1.json
stage v2 60 -- python3 -m llm_jax.bench "${GS64[@]}" --json=/tmp/bench/v2.json
stage flag_dot_merger 45 XLA_FLAGS=--xla_gpu_dot_merger_threshold_mb=2048 -- \
  python3 -m llm_jax.bench "${GS64[@]}" --json=/tmp/bench/flag_dot_merger.json
stage flag_cudnn_ln 45 XLA_FLAGS=--xla_gpu_enable_cudnn_layer_norm=true -- \
  python3 -m llm_jax.bench "${GS64[@]}" --json=/tmp/bench/flag_cudnn_ln.json
stage flag_lhs 45 XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true -- \
  python3 -m llm_jax.bench "${GS64[@]}" --json=/tmp/bench/flag_lhs.json

stage gpt_small 80 -- python3 -m llm_jax.bench --config=configs/gpt_small.py --synthetic --warmup=2 \
  --steps=6 --json=/tmp/bench/gpt_small.json --variant='train.microbatches=8' --variant='train.microbatches=4'

SHK=(--config=configs/shakespeare_char.py --config.data.corpus=.device_data/tinyshakespeare_train.txt
     --config.data.val_corpus=.device_data/tinyshakespeare_val.txt)
stage parity 120 -- python3 bench/shakespeare_parity.py "${SHK[@]}" --workdir=/tmp/shk_parity \
  --config.train.sample_every=0
cp /tmp/shk_parity/metrics.jsonl "$OUT/parity_metrics.jsonl" 2>/dev/null
grep best_val_loss /tmp/bench/parity.log | tee -a "$OUT/all.log"

EQ=("${SHK[@]}" --config.model.dropout=0.0 --warmup=0 --steps=199)
stage eq_original 60 -- bash -c "$IN_DIR" $PWD/.device_data/baseline "${EQ[@]}" --json=/tmp/bench/eq_original.json \
  --variant='train.microbatches=1' --variant='train.microbatches=2'
stage eq_optimized 40 -- python3 -m llm_jax.bench "${EQ[@]}" --json=/tmp/bench/eq_optimized.json
python3 bench/compare_losses.py /tmp/bench/eq_original.json /tmp/bench/eq_optimized.json 2>&1 | tee -a "$OUT/all.log"
cat /tmp/bench/eq_original.json /tmp/bench/eq_optimized.json > "$OUT/equivalence.json" 2>/dev/null

stage llama_1b 70 -- python3 -m llm_jax.bench --config=configs/llama_1b.py --synthetic \
  --config.train.global_batch_size=64 --config.train.microbatches=4 --warmup=1 --steps=3 \
  --json=/tmp/bench/llama_1b.json
grep -E "best_val|reference|microbatches=2:|(config):" "$OUT/all.log" | tail -6
table
