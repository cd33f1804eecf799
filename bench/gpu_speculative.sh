#!/usr/bin/env bash
# Speculative decoding on one GPU (docs/serving.md, "Speculative decoding on one H200"): a target of
# gpt_small's depth and width (12 x 768, 1,250 steps: its best validation loss) and a 1 x 384 draft,
# both trained on tiny Shakespeare with one character tokenizer (configs/shakespeare_char.py), then
# bench/speculative_speed.py: greedy tokens/s one prompt at a time with and without the draft, prompts
# of 32 tokens cut from the validation split, 200 new tokens (the context is 256); with the first
# draft also prompt lookup (--ngram 3: no draft model).
#
#   bash bench/gpu_speculative.sh      # repository root; $OUT (default runs/bench/device) gets the logs
#   env: SHAKESPEARE_DIR (bench/gpu_common.sh), TARGET_ARGS / DRAFT_ARGS (more --config overrides of
#        each run), DRAFTS (drafts' shapes, ";" between drafts), SPEC_ARGS (more
#        bench/speculative_speed.py flags, e.g. "--k 2,4,8" or "--dtype float32"), REUSE=1 (keep
#        /tmp/spec_* runs already trained on this machine), DISTILL=STEPS (default 1000; 0: skip):
#        the first draft also fine-tuned that many steps on the target's greedy continuations of
#        DISTILL_PROMPTS (8192) prompts from the training split (python -m llm_jax.finetune.distill),
#        timed at k = 4, 6, 8 and with ROWS (32) prompts a call at k = ROWS_K (default 2,4,6), ROWS_PROMPTS
#        prompts (default 2 x ROWS) in groups of ROWS and again with finished rows refilled; ROWS_ONLY=1
#        (train, distill and the ROWS run only: no one-prompt benchmarks, ~6 min on an H200); QUICK=1 (skip the
#        last two runs: sampled decoding at temperature 0.8, and float32 compute, whose tokens must
#        all equal greedy decoding's). On an H200 (2026-12-02): training ~245 s (target 135-160,
#        draft ~50, distillation ~50), each one-prompt benchmark ~80-150 s, the 32-rows run ~50 s;
#        QUICK=1 was still in its 32-rows run at 580 s, over one 600 s device call with it: REUSE=1 in a
#        second call on the same machine. SHAPES=gpt_small: both models with gpt_small's vocabulary
#        rows (50,304; the 384-piece tokenizer's ids below that) and context (1,024, trained on 512-token
#        windows, 32 a step), 256 new tokens a prompt: issue 16's decode shapes, with trained weights.
#
# CPU smoke test of the same logic (tiny runs, few tokens):
#   DISTILL=4 DISTILL_PROMPTS=16 ROWS=2 PY=.venv/bin/python TARGET_ARGS="--config.train.steps=4 --config.train.warmup_steps=2 --config.model.num_layers=1 \
#     --config.model.d_model=128 --config.model.num_heads=4" \
#     DRAFT_ARGS="--config.train.steps=4 --config.train.warmup_steps=2" SPEC_ARGS="--prompts 1 --new_tokens 16 --k 2 --repeats 1" \
#     OUT=/tmp/spec_out bash bench/gpu_speculative.sh
set -u
source bench/gpu_common.sh
python_env
shakespeare_data
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null
NEW=200 SHAPE_ARGS=""
case "${SHAPES:-}" in
  "") ;;
  gpt_small) NEW=256 SHAPE_ARGS="--config.model.vocab_size=50304 --config.model.max_seq_len=1024 \
    --config.train.seq_len=512 --config.train.global_batch_size=32" ;;
  *) echo "SHAPES=$SHAPES: unknown (gpt_small, or unset for the character model's own)" >&2; exit 2 ;;
esac
train() {  # train NAME OVERRIDES...: a run directory /tmp/spec_NAME
  local name=$1; shift
  if [ -n "${REUSE:-}" ] && [ -f "/tmp/spec_$name/metrics.jsonl" ]; then echo "reusing /tmp/spec_$name"; return; fi
  rm -rf "/tmp/spec_$name"
  # shellcheck disable=SC2086  # SHAPE_ARGS are words
  $PY -m llm_jax.train --config=configs/shakespeare_char.py --workdir="/tmp/spec_$name" \
    --config.data.corpus="$SHK_TRAIN" --config.data.val_corpus="$SHK_VAL" --config.data.cache_dir=/tmp/spec_cache \
    --config.train.sample_every=0 $SHAPE_ARGS "$@" > "$OUT/spec_$name.log" 2>&1 || { tail -20 "$OUT/spec_$name.log"; exit 1; }
  echo "[$(( $(date +%s) - T0 ))s] trained $name: $(grep -o 'val_loss[^,]*' "/tmp/spec_$name/metrics.jsonl" | tail -1)"
}
train target --config.model.num_layers=12 --config.model.d_model=768 --config.model.num_heads=12 \
  --config.train.steps=1250 ${TARGET_ARGS:-}
IFS=';' read -ra drafts <<< "${DRAFTS:---config.model.num_layers=1 --config.model.d_model=384 --config.model.num_heads=6 --config.train.steps=3000}"
for i in "${!drafts[@]}"; do
  # shellcheck disable=SC2086  # each draft's overrides are words
  train "draft$i" ${drafts[$i]} ${DRAFT_ARGS:-}
  [ -n "${ROWS_ONLY:-}" ] && continue
  $PY bench/speculative_speed.py --model /tmp/spec_target --draft "/tmp/spec_draft$i" --text "$SHK_VAL" \
    --prompt_tokens 32 --new_tokens $NEW --k 2,4,6 $([ "$i" = 0 ] && echo --ngram 3) ${SPEC_ARGS:-} \
    2>&1 | grep -v -E '^([IW][0-9]{4} |WARNING:absl)' | tee "$OUT/speculative$i.txt"
done
DISTILL=${DISTILL-1000}
if [ "$DISTILL" != 0 ]; then  # the first draft fine-tuned on the target's greedy continuations
  $PY -m llm_jax.finetune.distill --workdir=/tmp/spec_target --text="$SHK_TRAIN" --out=/tmp/spec_distill.jsonl \
    --overwrite --prompts="${DISTILL_PROMPTS:-8192}" --prompt_tokens=32 --new_tokens=200 2>&1 \
    | grep -v -E '^([IW][0-9]{4} |WARNING:absl)'
  # shellcheck disable=SC2086  # the overrides are words
  train distilled ${drafts[0]} ${DRAFT_ARGS:-} --config.init_from=/tmp/spec_draft0 --config.reuse_source_tokenizer=True \
    --config.data.corpus=/tmp/spec_distill.jsonl --config.train.steps="$DISTILL" --config.train.warmup_steps=$(( DISTILL / 20 + 1 ))
  # shellcheck disable=SC2086  # SPEC_ARGS are words
  [ -n "${ROWS_ONLY:-}" ] || $PY bench/speculative_speed.py --model /tmp/spec_target --draft /tmp/spec_distilled \
    --text "$SHK_VAL" --prompt_tokens 32 --new_tokens $NEW --k 4,6,8 ${SPEC_ARGS:-} \
    2>&1 | grep -v -E '^([IW][0-9]{4} |WARNING:absl)' | tee "$OUT/speculative_distilled.txt"
  # the same draft with ROWS prompts a call (issue 16's batch-32 figure)
  # shellcheck disable=SC2086  # SPEC_ARGS are words
  $PY bench/speculative_speed.py --model /tmp/spec_target --draft /tmp/spec_distilled --text "$SHK_VAL" \
    --prompt_tokens 32 --new_tokens $NEW --k "${ROWS_K:-2,4,6}" --prompts "${ROWS_PROMPTS:-$(( 2 * ${ROWS:-32} ))}" \
    --batch "${ROWS:-32}" --refill --repeats 2 ${SPEC_ARGS:-} 2>&1 | grep -v -E '^([IW][0-9]{4} |WARNING:absl)' | tee "$OUT/speculative_rows.txt"
fi
[ -n "${QUICK:-}${ROWS_ONLY:-}" ] && exit 0
spec() {  # spec NAME FLAGS...: the first draft again, k = 4 only; returns the benchmark's status
  local name=$1; shift
  # shellcheck disable=SC2086  # SPEC_ARGS are words
  $PY bench/speculative_speed.py --model /tmp/spec_target --draft /tmp/spec_draft0 --text "$SHK_VAL" \
    --prompt_tokens 32 --new_tokens $NEW --k 4 "$@" ${SPEC_ARGS:-} 2>&1 \
    | grep -v -E '^([IW][0-9]{4} |WARNING:absl)' | tee "$OUT/speculative_$name.txt"
  return "${PIPESTATUS[0]}"
}
spec sampled --temperature 0.8 --ngram 3 --repeats 2  # speculative sampling against plain sampling
spec float32 --dtype float32 --repeats 1  # exact equality with greedy decoding (exits 1 otherwise)
echo "float32 check: exit status $?"
