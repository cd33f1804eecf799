#!/usr/bin/env bash
# Quality parity through the real training command (docs/performance.md): configs/shakespeare_char.py
# on tiny Shakespeare (char tokenizer), timed end to end, then the best validation loss from metrics.jsonl.
#
#   bash bench/gpu_shakespeare_train.sh     (repository root; $OUT, default runs/bench/device, gets the logs)
#   env: SHAKESPEARE_DIR (default runs/data/tinyshakespeare; written by bench/shakespeare_data.py if missing)
set -u
source bench/gpu_common.sh
python_env
shakespeare_data
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null
run() {  # run NAME OVERRIDES...
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  rm -rf "/tmp/$name"
  $PY -m llm_jax.train --config=configs/shakespeare_char.py --workdir="/tmp/$name" \
    --config.data.corpus="$SHK_TRAIN" --config.data.val_corpus="$SHK_VAL" \
    --config.data.cache_dir=/tmp/cache "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  $PY - "$name" "$rc" "$t0" <<'PY'
import json, sys, time
name, rc, t0 = sys.argv[1], sys.argv[2], float(sys.argv[3])
rows = [json.loads(l) for l in open(f"/tmp/{name}/metrics.jsonl")]
val = [(round(r["val_loss"], 4), r["step"]) for r in rows if "val_loss" in r]
print(f"{name}: rc={rc} wall={time.time() - t0:.1f}s best_val={min(val) if val else None} last={val[-1] if val else None}")
PY
  cp "/tmp/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl"
}
run shakespeare "$@"
grep -E "sample|compile|preflight" "$OUT/shakespeare.log" | head -5
