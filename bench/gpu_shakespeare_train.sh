#!/usr/bin/env bash
# Device call: quality parity through the real training command (configs/shakespeare_char.py on tiny
# Shakespeare, char tokenizer), timed end to end, then the best validation loss from metrics.jsonl.
#   carry: .whl .device_data/tinyshakespeare_train.txt .device_data/tinyshakespeare_val.txt
set -u
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
nvidia-smi --query-gpu=name --format=csv,noheader
run() {  # run NAME OVERRIDES...
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  python3 -m llm_jax.train --config=configs/shakespeare_char.py --workdir=/tmp/$name \
    --config.data.corpus=.device_data/tinyshakespeare_train.txt \
    --config.data.val_corpus=.device_data/tinyshakespeare_val.txt \
    --config.data.cache_dir=/tmp/cache "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  python3 - "$name" "$rc" "$t0" <<'PY'
import json, sys, time
name, rc, t0 = sys.argv[1], sys.argv[2], float(sys.argv[3])
rows = [json.loads(l) for l in open(f"/tmp/{name}/metrics.jsonl")]
val = [(round(r["val_loss"], 4), r["step"]) for r in rows if "val_loss" in r]
print(f"{name}: rc={rc} wall={time.time() - t0:.1f}s best_val={min(val) if val else None} last={val[-1] if val else None}")
PY
  cp /tmp/$name/metrics.jsonl "$OUT/$name.metrics.jsonl"
}
run shakespeare
grep -E "sample|compile|preflight" "$OUT/shakespeare.log" | head -5
