#!/usr/bin/env bash
# Device call (run with bench/make_device_data.sh done first; see docs/performance.md):
# call 5 (final figures of the final tree): gpt_small at its real batch (cold start in the
# first row), llama_1b at its real batch, the 200-step equivalence against the original code, quality
# parity through the real loop, and a kernel profile of the final gpt_small step.
set -u
source bench/gpu_common.sh
stage gpt_small 80 -- python3 -m llm_jax.bench --config=configs/gpt_small.py --synthetic --warmup=2 \
  --steps=6 --json=/tmp/bench/gpt_small.json --variant='train.microbatches=8' --variant='train.microbatches=4'
stage llama_1b 110 -- python3 -m llm_jax.bench --config=configs/llama_1b.py --synthetic --warmup=1 \
  --steps=3 --json=/tmp/bench/llama_1b.json

D=$PWD/.device_data
EQ=(--config=configs/shakespeare_char.py --config.data.corpus=$D/tinyshakespeare_train.txt
    --config.data.val_corpus=$D/tinyshakespeare_val.txt --config.model.dropout=0.0 --warmup=0 --steps=199)
stage eq_original 60 -- bash -c 'cd "$0" && exec python3 -m llm_jax.bench "$@"' $D/baseline "${EQ[@]}" \
  --json=/tmp/bench/eq_original.json --variant='train.microbatches=1' --variant='train.microbatches=2'
stage eq_optimized 40 -- python3 -m llm_jax.bench "${EQ[@]}" --config.model.attention_dropout=0.0 \
  --json=/tmp/bench/eq_optimized.json
python3 bench/compare_losses.py /tmp/bench/eq_original.json /tmp/bench/eq_optimized.json 2>&1 | tee -a "$OUT/all.log"
python3 -c "import json,sys; json.dump([json.load(open(p)) for p in sys.argv[1:]], open('$OUT/equivalence.json','w'))" \
  /tmp/bench/eq_original.json /tmp/bench/eq_optimized.json

stage parity_random 100 -- python3 bench/shakespeare_parity.py --config=configs/shakespeare_char.py \
  --config.data.corpus=$D/tinyshakespeare_train.txt --config.data.val_corpus=$D/tinyshakespeare_val.txt \
  --config.train.sample_every=0 --workdir=/tmp/shk_random
grep best_val_loss /tmp/bench/parity_random.log | tee -a "$OUT/all.log"
cp /tmp/shk_random/metrics.jsonl "$OUT/parity_random_metrics.jsonl" 2>/dev/null

GS64=(--config=configs/gpt_small.py --synthetic --config.train.global_batch_size=64
      --config.train.microbatches=1 --warmup=3 --steps=6)
stage profile 50 XLA_FLAGS=--xla_gpu_enable_command_buffer= -- python3 -m llm_jax.bench "${GS64[@]}" \
  --config.train.profile_steps=1,3 --workdir=/tmp/prof --json=/tmp/bench/profile.json
python3 bench/analyze_trace.py /tmp/prof/tb --steps 2 --top 40 > "$OUT/trace_gpt_small.txt" 2>&1
cp "$(find /tmp/prof/tb -name '*.trace.json.gz' | head -1)" "$OUT/gpt_small.trace.json.gz" 2>/dev/null
sed -n 1,16p "$OUT/trace_gpt_small.txt"
grep -E "best_val|reference|microbatches=2:|\(config\):" "$OUT/all.log" | tail -6
table
