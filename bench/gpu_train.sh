#!/usr/bin/env bash
# The training-step figures of docs/performance.md on one GPU, from a clean clone:
#
#   bash bench/gpu_train.sh [STAGE ...]        (repository root; results under $OUT, default runs/bench/device)
#   stages: gpt_small llama_1b profile equivalence parity before table
#           (default: all but `before`, which runs only with BEFORE set)
#   env:    BEFORE=DIR  a checkout of another commit (e.g. `git worktree add /tmp/before HEAD~1`): the
#                       `before` stage runs the gpt_small row there, for a before/after pair from one machine
#           SHAKESPEARE_DIR  where tiny Shakespeare is (or is written to; see bench/shakespeare_data.py)
#
# gpt_small at its real batch (8 and 4 passes of 60 / 120 rows; the first row's compile and first step
# are the cold start), llama_1b at its real batch, a kernel profile of the 64 x 1024 gpt_small step
# (bench/analyze_trace.py), the 200-step loss equivalence of the plain path (scanned layers, float32
# logits) and the default one on tiny Shakespeare (bench/compare_losses.py), and quality parity through
# the real loop (bench/shakespeare_parity.py). $OUT/all.log holds each stage's tail; the table is last.
set -u
source bench/gpu_common.sh
python_env
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$OUT/all.log"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)" \
  2>&1 | tail -1 | tee -a "$OUT/all.log"

GS=(--config=configs/gpt_small.py --synthetic --warmup=2 --steps=6)
GS64=(--config=configs/gpt_small.py --synthetic --config.train.global_batch_size=64
      --config.train.microbatches=1 --warmup=3 --steps=6)

stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then
  stages=(gpt_small llama_1b profile equivalence parity)
  [ -n "${BEFORE:-}" ] && stages+=(before)
  stages+=(table)
fi
for s in "${stages[@]}"; do
  case "$s" in
    gpt_small)
      stage gpt_small 120 -- $PY -m llm_jax.bench "${GS[@]}" --json=/tmp/bench/gpt_small.json \
        --variant='train.microbatches=8' --variant='train.microbatches=4' ;;
    llama_1b)
      stage llama_1b 150 -- $PY -m llm_jax.bench --config=configs/llama_1b.py --synthetic --warmup=1 \
        --steps=3 --json=/tmp/bench/llama_1b.json ;;
    profile)
      stage profile 90 XLA_FLAGS=--xla_gpu_enable_command_buffer= -- $PY -m llm_jax.bench "${GS64[@]}" \
        --config.train.profile_steps=1,3 --workdir=/tmp/prof --json=/tmp/bench/profile.json
      $PY bench/analyze_trace.py /tmp/prof/tb --steps 2 --top 40 > "$OUT/trace_gpt_small.txt" 2>&1
      sed -n 1,16p "$OUT/trace_gpt_small.txt" ;;
    equivalence)
      shakespeare_data
      stage equivalence 90 -- $PY -m llm_jax.bench --config=configs/shakespeare_char.py \
        --config.data.corpus="$SHK_TRAIN" --config.data.val_corpus="$SHK_VAL" --config.model.dropout=0.0 \
        --config.model.attention_dropout=0.0 --warmup=0 --steps=199 --json=/tmp/bench/equivalence.json \
        --variant='model.scan_unroll=1 model.logits_dtype=float32' --variant='model.scan_unroll=6'
      $PY bench/compare_losses.py /tmp/bench/equivalence.json 2>&1 | tee -a "$OUT/all.log" ;;
    parity)
      shakespeare_data
      stage parity 150 -- $PY bench/shakespeare_parity.py --config=configs/shakespeare_char.py \
        --config.data.corpus="$SHK_TRAIN" --config.data.val_corpus="$SHK_VAL" \
        --config.train.sample_every=0 --workdir=/tmp/shk_parity
      grep best_val_loss /tmp/bench/parity.log | tee -a "$OUT/all.log" ;;
    before)
      [ -n "${BEFORE:-}" ] || { echo "the before stage needs BEFORE=DIR" >&2; continue; }
      stage before 120 PYTHONPATH="${PYTHONPATH//$PWD/$BEFORE}" -- bash -c 'cd "$0" && exec "$@"' "$BEFORE" \
        $PY -m llm_jax.bench "${GS[@]}" --json=/tmp/bench/before.json --variant='train.microbatches=8' ;;
    table) table ;;
    *) echo "unknown stage $s (gpt_small llama_1b profile equivalence parity before table)" >&2 ;;
  esac
done
echo "total $(( $(date +%s) - T0 )) s"
