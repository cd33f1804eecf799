#!/usr/bin/env bash
# Device call (run with bench/make_device_data.sh done first; see docs/performance.md):
# call 2: shakespeare_char quality parity through the real training loop; gpt_small at its real
# global batch (480 x 1024) with the layers unrolled inside the scan; a profile + optimized-HLO dump of
# the 64 x 1024 step (command buffers off so kernels carry their HLO names); llama_1b batch/remat rows;
# the 200-step loss equivalence of the plain and the optimized step on real data.
set -u
source bench/gpu_common.sh
SHK=(--config=configs/shakespeare_char.py --config.data.corpus=.device_data/tinyshakespeare_train.txt
     --config.data.val_corpus=.device_data/tinyshakespeare_val.txt)

t=$(date +%s.%N)
stage shakespeare 150 -- python3 -m llm_jax.train "${SHK[@]}" --workdir=/tmp/shk \
  --config.train.sample_every=0 --config.model.scan_unroll=6
echo "shakespeare command wall $(python3 -c "import time;print(round(time.time()-$t,1))") s" | tee -a "$OUT/all.log"
cp /tmp/shk/metrics.jsonl "$OUT/shakespeare_metrics.jsonl" 2>/dev/null
python3 - <<'PY' | tee -a "$OUT/all.log"
import json
rows = [json.loads(l) for l in open("/tmp/shk/metrics.jsonl")]
val = [(r["val_loss"], r["step"]) for r in rows if "val_loss" in r]
print("shakespeare best val", min(val) if val else None, "evals", len(val),
      "median tok/s", sorted(r.get("tokens_per_s", 0) for r in rows)[len(rows) // 2])
PY

GS=(--config=configs/gpt_small.py --synthetic --config.model.scan_unroll=12)
stage gs_real 130 -- python3 -m llm_jax.bench "${GS[@]}" --warmup=1 --steps=4 \
  --json=/tmp/bench/gs_real.json --variant='train.microbatches=8' --variant='train.microbatches=5' \
  --variant='train.microbatches=4'

stage gs_profile 80 XLA_FLAGS="--xla_gpu_enable_command_buffer= --xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=train_step" -- \
  python3 -m llm_jax.bench "${GS[@]}" --config.train.global_batch_size=64 --config.train.microbatches=1 \
  --warmup=3 --steps=5 --config.train.profile_steps=1,3 --json=/tmp/bench/gs_profile.json
python3 bench/analyze_trace.py runs/bench/tb --steps 2 --top 45 > "$OUT/trace_gpt_small.txt" 2>&1
f=$(ls -S /tmp/dump/*train_step*after_optimizations.txt 2>/dev/null | head -1)
[ -n "$f" ] && gzip -c "$f" > "$OUT/gs_after_optimizations.txt.gz"

LL=(--config=configs/llama_1b.py --synthetic --config.model.scan_unroll=16 --config.train.global_batch_size=64)
stage llama 170 -- python3 -m llm_jax.bench "${LL[@]}" --warmup=1 --steps=3 --json=/tmp/bench/llama.json \
  --variant='train.microbatches=4 model.remat=none' --variant='train.microbatches=2 model.remat=none' \
  --variant='train.microbatches=1 model.remat=dots_no_batch'

stage equivalence 60 -- python3 -m llm_jax.bench "${SHK[@]}" --config.model.dropout=0.0 --warmup=0 \
  --steps=199 --json=/tmp/bench/equivalence.json \
  --variant='model.scan_unroll=1 model.logits_dtype=float32' --variant='model.scan_unroll=6'
python3 bench/compare_losses.py /tmp/bench/equivalence.json 2>&1 | tee -a "$OUT/all.log"
cp /tmp/bench/equivalence.json "$OUT/equivalence.json" 2>/dev/null
head -75 "$OUT/trace_gpt_small.txt"
grep -E "shakespeare|compare|reference|scan_unroll=6:" "$OUT/all.log" | tail -8
table
