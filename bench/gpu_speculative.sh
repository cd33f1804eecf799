#!/usr/bin/env bash
# Speculative decoding on one GPU (docs/serving.md, "Sampling from the command line"): a target and a
# small draft trained on tiny Shakespeare with one character tokenizer (configs/shakespeare_char.py,
# the draft narrower and shallower), then bench/speculative_speed.py: greedy tokens/s one prompt at a
# time with and without the draft, prompts cut from the validation split.
#
#   bash bench/gpu_speculative.sh      # repository root; $OUT (default runs/bench/device) gets the logs
#   env: SHAKESPEARE_DIR (bench/gpu_common.sh), TARGET_ARGS / DRAFT_ARGS (more --config overrides of
#        each run), SPEC_ARGS (more bench/speculative_speed.py flags, e.g. "--k 2,4,8")
#
# CPU smoke test of the same logic (tiny runs, few tokens):
#   PY=.venv/bin/python TARGET_ARGS="--config.train.steps=4 --config.model.num_layers=1" \
#     DRAFT_ARGS="--config.train.steps=4" SPEC_ARGS="--prompts 1 --new_tokens 16 --k 2 --repeats 1" \
#     OUT=/tmp/spec_out bash bench/gpu_speculative.sh
set -u
source bench/gpu_common.sh
python_env
shakespeare_data
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null
train() {  # train NAME OVERRIDES...: a run directory /tmp/spec_NAME
  local name=$1; shift
  rm -rf "/tmp/spec_$name"
  $PY -m llm_jax.train --config=configs/shakespeare_char.py --workdir="/tmp/spec_$name" \
    --config.data.corpus="$SHK_TRAIN" --config.data.val_corpus="$SHK_VAL" --config.data.cache_dir=/tmp/spec_cache \
    --config.train.sample_every=0 "$@" > "$OUT/spec_$name.log" 2>&1 || { tail -20 "$OUT/spec_$name.log"; exit 1; }
  echo "[$(( $(date +%s) - T0 ))s] trained $name: $(grep -o 'val_loss[^,]*' "/tmp/spec_$name/metrics.jsonl" | tail -1)"
}
train target ${TARGET_ARGS:-}
train draft --config.model.num_layers=2 --config.model.d_model=128 --config.model.num_heads=4 ${DRAFT_ARGS:-}
$PY bench/speculative_speed.py --model /tmp/spec_target --draft /tmp/spec_draft --text "$SHK_VAL" ${SPEC_ARGS:-} \
  2>&1 | grep -v -E '^([IW][0-9]{4} |WARNING:absl)' | tee "$OUT/speculative.txt"
