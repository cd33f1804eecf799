#!/usr/bin/env bash
# Device call (run with bench/make_device_data.sh done first; see docs/performance.md):
# call 1 (exploration): versions; the plain step (the code before this work, carried in
# .device_data/baseline) against each lever on gpt_small (64 x 1024 per step, so compiles dominate
# less), a profile of the unrolled step, two XLA flags, one llama_1b row.
set -u
source bench/gpu_common.sh
python3 -c "import jax, flax, optax, orbax.checkpoint as o, grain; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'grain ok', jax.devices())" 2>&1 | tail -2 | tee -a "$OUT/all.log"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee -a "$OUT/all.log"

GS=(--config=configs/gpt_small.py --synthetic --config.train.global_batch_size=64 --warmup=2 --steps=8)
stage plain 110 -- bash -c 'cd .device_data/baseline && exec python3 -m llm_jax.bench "$@"' _ \
  "${GS[@]}" --config.train.microbatches=4 --json=/tmp/bench/plain.json
stage levers 300 -- python3 -m llm_jax.bench "${GS[@]}" --json=/tmp/bench/levers.json \
  --variant='train.microbatches=4 model.logits_dtype=float32' \
  --variant='train.microbatches=4' \
  --variant='train.microbatches=4 model.scan_layers=False' \
  --variant='train.microbatches=2 model.scan_layers=False' \
  --variant='train.microbatches=1 model.scan_layers=False train.profile_steps=1,3'
python3 bench/analyze_trace.py runs/bench/tb --steps 2 --top 30 > "$OUT/trace_gpt_small.txt" 2>&1
cp "$(ls -t $(find runs/bench/tb -name '*.trace.json.gz') | head -1)" "$OUT/gpt_small.trace.json.gz" 2>/dev/null
stage no_triton_gemm 75 XLA_FLAGS=--xla_gpu_enable_triton_gemm=false -- \
  python3 -m llm_jax.bench "${GS[@]}" --config.train.microbatches=2 --config.model.scan_layers=False \
  --json=/tmp/bench/no_triton_gemm.json
stage no_cmd_buffer 75 XLA_FLAGS=--xla_gpu_enable_command_buffer= -- \
  python3 -m llm_jax.bench "${GS[@]}" --config.train.microbatches=2 --config.model.scan_layers=False \
  --json=/tmp/bench/no_cmd_buffer.json
head -60 "$OUT/trace_gpt_small.txt"
table
