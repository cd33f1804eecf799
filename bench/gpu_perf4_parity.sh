#!/usr/bin/env bash
# Device call (run with bench/make_device_data.sh done first; see docs/performance.md):
# call 4: attribution of the code versions on the 64 x 1024 gpt_small step (v0: custom
# cross-entropy + bfloat16 logits + unrolled layers; v1: + activation gradients that keep only their
# inputs; v2: + one-pass online log-sum-exp = this tree); quality parity through the real loop with
# attention dropout (random-offset windows, and the packaged loader); 200-step equivalence against the
# original code; a kernel profile; the final gpt_small and llama_1b figures at their real batches.
set -u
source bench/gpu_common.sh
IN_DIR='cd "$0" && exec python3 -m llm_jax.bench "$@"'
GS64=(--config=configs/gpt_small.py --synthetic --config.train.global_batch_size=64
      --config.train.microbatches=1 --config.model.scan_unroll=12 --warmup=2 --steps=8)
stage v0 50 -- bash -c "$IN_DIR" .device_data/v0 "${GS64[@]}" --json=/tmp/bench/v0.json
stage v1 50 -- bash -c "$IN_DIR" .device_data/v1 "${GS64[@]}" --json=/tmp/bench/v1.json
stage v2 50 -- python3 -m llm_jax.bench "${GS64[@]}" --json=/tmp/bench/v2.json

SHK=(--config=configs/shakespeare_char.py --config.data.corpus=.device_data/tinyshakespeare_train.txt
     --config.data.val_corpus=.device_data/tinyshakespeare_val.txt --config.train.sample_every=0)
stage parity_random 100 -- python3 bench/shakespeare_parity.py "${SHK[@]}" --workdir=/tmp/shk_random
grep best_val_loss /tmp/bench/parity_random.log | tee -a "$OUT/all.log"
cp /tmp/shk_random/metrics.jsonl "$OUT/parity_random_metrics.jsonl" 2>/dev/null
t=$(date +%s.%N)
stage parity_loader 100 -- python3 -m llm_jax.train "${SHK[@]}" --workdir=/tmp/shk_loader
echo "parity_loader command wall $(python3 -c "import time;print(round(time.time()-$t,1))") s" | tee -a "$OUT/all.log"
cp /tmp/shk_loader/metrics.jsonl "$OUT/parity_loader_metrics.jsonl" 2>/dev/null
python3 - <<'PY' | tee -a "$OUT/all.log"
import json
rows = [json.loads(l) for l in open("/tmp/shk_loader/metrics.jsonl")]
val = [(r["val_loss"], r["step"]) for r in rows if "val_loss" in r]
print("parity_loader best val", min(val) if val else None)
PY

EQ=(--config=configs/shakespeare_char.py --config.data.corpus=.device_data/tinyshakespeare_train.txt
    --config.data.val_corpus=.device_data/tinyshakespeare_val.txt --config.model.dropout=0.0
    --warmup=0 --steps=199)
stage eq_original 60 -- bash -c "$IN_DIR" .device_data/baseline "${EQ[@]}" --json=/tmp/bench/eq_original.json \
  --variant='train.microbatches=1' --variant='train.microbatches=2'
stage eq_optimized 40 -- python3 -m llm_jax.bench "${EQ[@]}" --config.model.attention_dropout=0.0 \
  --json=/tmp/bench/eq_optimized.json
python3 bench/compare_losses.py /tmp/bench/eq_original.json /tmp/bench/eq_optimized.json 2>&1 | tee -a "$OUT/all.log"
python3 -c "import json,sys; json.dump([json.load(open(p)) for p in sys.argv[1:]], open('$OUT/equivalence.json','w'))" \
  /tmp/bench/eq_original.json /tmp/bench/eq_optimized.json

stage profile 50 XLA_FLAGS=--xla_gpu_enable_command_buffer= -- python3 -m llm_jax.bench "${GS64[@]}" \
  --config.train.profile_steps=1,3 --workdir=/tmp/prof --json=/tmp/bench/profile.json
python3 bench/analyze_trace.py /tmp/prof/tb --steps 2 --top 40 > "$OUT/trace_gpt_small.txt" 2>&1
cp "$(find /tmp/prof/tb -name '*.trace.json.gz' | head -1)" "$OUT/gpt_small.trace.json.gz" 2>/dev/null

stage gpt_small 80 -- python3 -m llm_jax.bench --config=configs/gpt_small.py --synthetic --warmup=2 \
  --steps=6 --json=/tmp/bench/gpt_small.json --variant='train.microbatches=8' --variant='train.microbatches=4'
stage llama_1b 60 -- python3 -m llm_jax.bench --config=configs/llama_1b.py --synthetic --warmup=1 --steps=3 \
  --json=/tmp/bench/llama_1b.json
sed -n 1,30p "$OUT/trace_gpt_small.txt"
grep -E "best_val|parity_loader command|reference|microbatches=2:|\(config\):" "$OUT/all.log" | tail -8
table
