#!/usr/bin/env bash
# The PyTorch reference and llm_jax on the same GPU in one run (issue 16, docs/performance.md "Training
# switches"): nanoGPT's bench.py (12 x 1024, torch.compile, random data) and
# `python -m llm_jax.bench --config=configs/gpt_small.py --synthetic` with the preset and other rows as
# --variants (SPEED_VARIANTS), alternating nanoGPT / llm_jax twice; the last lines are a table of tokens/s and
# the ratio llm_jax / nanoGPT of the same round. bench.py's model has no biases (its bias = False), the
# gpt_small preset has them: the row `model.use_bias=False` is the same model as the reference's
# (or NANOGPT_ARGS=--bias=True gives the reference the preset's biases). A ratio whose row's biases
# differ from the reference's is marked * (SPEED_VARIANTS replaces the default rows, preset included).
#
#   bash bench/gpu_side_by_side.sh [speed] [parity] [parity_bpe] [parity_seeds] [kernels]   (default: speed kernels)
#     speed       the side-by-side above: the preset and `model.use_bias=False`, two rounds (~5 min on
#                 an H200; the switches' four rows take ~10 min, over a 600 s device call: ROUNDS=1)
#     (the llm_jax rows use train.loss_kernel's default, auto: the fused loss kernel on a GPU; the parity
#     stages below pin XLA's loss except in their `kernel` runs)
#     parity      2000 steps of configs/shakespeare_char.py through `python -m llm_jax.train`: switches off
#                 (seeds 0 and 1: the seed-to-seed spread), model.fp8, train.loss_chunks; val-loss curves
#                 and best/final val losses (~4 min)
#     parity_bpe  the same on tiny Shakespeare with a 2048-piece BPE tokenizer
#     parity_seeds  off / model.fp8 / train.loss_chunks=4 with SEEDS seeds each (default 4, from SEED0,
#                 default 0; PARALLEL
#                 trainings at a time, default 4; PARITY_GROUPS, default "off fp8 chunks", also
#                 fp8head: model.fp8 with model.fp8_head, kernel: train.loss_kernel=pallas, gelu:
#                 model.gelu_kernel=mosaic; PARITY_LIMIT s a
#                 training, default 300; PARITY_DEADLINE: no wave of PARALLEL trainings starts unless the
#                 last one's time fits before this many s from the script's start, so a device call's
#                 limit cuts no summary), the curves and each switch against the seeds' spread with the
#                 paired t of best losses (bench/parity_summary.py); then per-step training losses of the
#                 switches in float32 and in bfloat16 compute from one start (CHECK_STEPS, default 200; CHECK_DTYPES, default
#                 "float32 bfloat16"; bench/compare_losses.py); ~10 min with both dtypes, ~8 with one
#     kernels     bench/kernel_probe.py: jax's Pallas GPU attention / layer norm (and Tokamax's kernels where it
#                 is installed) against what the model uses
#   env: NANOGPT_DIR  nanoGPT's bench.py, model.py and configurator.py (default .nanogpt/, git-ignored;
#                     when missing the script prints how to fetch them and runs the llm_jax rows only)
#        NANOGPT_ARGS (extra bench.py --key=value overrides) and NANOGPT_TOKENS (its tokens per iteration,
#        default 12 x 1024 = 12288), ROUNDS (speed's nanoGPT / llm_jax rounds, default 2),
#        SPEED_VARIANTS (its llm_jax rows, ';'-separated override sets, '' the preset; default
#        ";model.use_bias=False"; the switches: ";model.fp8=True;train.loss_chunks=8"), STEPS, WARMUP
#        (llm_jax.bench timed / untimed steps, default 6 / 2), PARITY_STEPS (2000), SHAKESPEARE_DIR, OUT
#        (runs/bench/device)
#
# CPU smoke test of the shell logic (tiny model; no nanoGPT unless NANOGPT_DIR has it and torch runs):
#   PY=$PWD/.venv/bin/python CONFIG=configs/tiny.py STEPS=2 WARMUP=0 NANOGPT_DIR=/tmp/fake_nanogpt \
#     PARITY_CONFIG=configs/tiny.py PARITY_STEPS=20 PARITY_ARGS='--config.train.eval_every=10 \
#     --config.train.eval_batches=2 --config.train.warmup_steps=5' SHAKESPEARE_DIR=DIR_WITH_THE_SPLITS \
#     OUT=/tmp/sbs bash bench/gpu_side_by_side.sh speed parity
#   (/tmp/fake_nanogpt: a bench.py that exits 1 with --compile=True and else prints two
#   "time per iteration: X ms" lines, plus empty model.py and configurator.py: it exercises the fallback)
set -u
if [[ -n ${PARITY_DEADLINE:-} && ! $PARITY_DEADLINE =~ ^[0-9]+$ ]]; then
  echo "PARITY_DEADLINE=$PARITY_DEADLINE: expected whole seconds from the script's start, e.g. 540" >&2
  exit 2
fi
source bench/gpu_common.sh
python_env
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
NANOGPT_DIR=${NANOGPT_DIR:-.nanogpt}
NANOGPT_ARGS=${NANOGPT_ARGS:-}  # extra bench.py overrides (smoke tests); set NANOGPT_TOKENS to match
NANOGPT_TOKENS=${NANOGPT_TOKENS:-12288}  # tokens per bench.py iteration: its 12 x 1024
CONFIG=${CONFIG:-configs/gpt_small.py}
STEPS=${STEPS:-6}
WARMUP=${WARMUP:-2}
PARITY_STEPS=${PARITY_STEPS:-2000}
PARITY_CONFIG=${PARITY_CONFIG:-configs/shakespeare_char.py}
PARITY_ARGS=${PARITY_ARGS:-}  # extra --config.x=y overrides of every parity run (smoke tests)
IFS=';' read -r -a VARIANTS <<< \
  "${SPEED_VARIANTS-;model.use_bias=False}"
[ ${#VARIANTS[@]} -eq 0 ] && VARIANTS=("")  # SPEED_VARIANTS='' : the preset's row only
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$OUT/all.log"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)" \
  2>&1 | tail -1 | tee -a "$OUT/all.log"

have_nanogpt() {
  local f
  for f in bench.py model.py configurator.py; do
    if [ ! -f "$NANOGPT_DIR/$f" ]; then
      cat <<EOF | tee -a "$OUT/all.log"
nanoGPT's $f is missing from NANOGPT_DIR=$NANOGPT_DIR: fetch the three files on a machine with network
access (they are never committed here; .nanogpt/ is git-ignored), e.g.
  mkdir -p .nanogpt && for f in bench.py model.py configurator.py; do
    curl -fsSL https://raw.githubusercontent.com/karpathy/nanoGPT/master/\$f -o .nanogpt/\$f; done
and pass .nanogpt with the run (carry). Running the llm_jax rows only.
EOF
      return 1
    fi
  done
}

COMPILE=True
nanogpt_round() {  # nanogpt_round R: bench.py once (compile, else eager), appends {"round", "ms"} to nanogpt.jsonl
  local r=$1 name="nanogpt_$1" ms
  stage "$name" 240 -- bash -c 'cd "$0" && exec "$@"' "$NANOGPT_DIR" $PY bench.py --real_data=False \
    --compile=$COMPILE $NANOGPT_ARGS
  ms=$(grep -o 'time per iteration: [0-9.]*' "/tmp/bench/$name.log" | tail -1 | grep -o '[0-9.]*$')
  if [ -z "$ms" ] && [ "$COMPILE" = True ]; then
    echo "nanoGPT with torch.compile failed (see $OUT/all.log): falling back to --compile=False" \
      | tee -a "$OUT/all.log"
    COMPILE=False
    stage "$name" 180 -- bash -c 'cd "$0" && exec "$@"' "$NANOGPT_DIR" $PY bench.py --real_data=False \
      --compile=False $NANOGPT_ARGS
    ms=$(grep -o 'time per iteration: [0-9.]*' "/tmp/bench/$name.log" | tail -1 | grep -o '[0-9.]*$')
  fi
  [ -n "$ms" ] && echo "{\"round\": $r, \"ms\": $ms, \"compile\": \"$COMPILE\", \"tokens\": $NANOGPT_TOKENS}" \
    >> "$OUT/nanogpt.jsonl"
}

llm_jax_round() {  # llm_jax_round R: the default row and every switch, one process
  local r=$1 v args=()
  for v in "${VARIANTS[@]}"; do args+=(--variant="$v"); done
  stage "llm_jax_$r" 300 -- $PY -m llm_jax.bench --config="$CONFIG" --synthetic --warmup="$WARMUP" \
    --steps="$STEPS" --json="/tmp/bench/llm_jax_$r.json" "${args[@]}"
}

side_by_side_table() {
  $PY - "$OUT/results.jsonl" "$OUT/nanogpt.jsonl" "$NANOGPT_ARGS" <<'PY' | tee -a "$OUT/all.log"
import json, os, sys
jax_rows, ref = {}, {}
if os.path.exists(sys.argv[1]):
  for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["stage"].startswith("llm_jax_"):
      r = int(d["stage"].rsplit("_", 1)[1])
      for row in d["rows"]:
        tps = row.get("tokens_per_s") if row.get("status") == "ok" else None
        jax_rows.setdefault(row["label"], {})[r] = (tps, row.get("status", "?"), row.get("use_bias"))
if os.path.exists(sys.argv[2]):
  for line in open(sys.argv[2]):
    d = json.loads(line)
    ref[d["round"]] = (d["tokens"] / d["ms"] * 1000, d["compile"])
rounds = sorted(set(ref) | {r for v in jax_rows.values() for r in v})
ref_bias, unlike = "--bias=True" in sys.argv[3].split(), set()  # bench.py's own default: no biases
print("\nside by side (tokens/s; ratio = llm_jax / nanoGPT of the same round)")
print(f"{'row':48s}" + "".join(f" {'round ' + str(r):>12s} {'ratio':>6s}" for r in rounds))
line = f"{'nanoGPT bench.py 12x1024':48s}"
for r in rounds:
  tps, comp = ref.get(r, (None, ""))
  line += f" {tps:12,.0f} {'c' if comp == 'True' else 'eager':>6s}" if tps else f" {'-':>12s} {'':>6s}"
print(line)
for label, by_round in jax_rows.items():
  line = f"{'llm_jax ' + label:48s}"[:48]
  for r in rounds:
    tps, status, bias = by_round.get(r, (None, "-", None))
    if tps is None:
      line += f" {status[:12]:>12s} {'':>6s}"
      continue
    ratio = f"{tps / ref[r][0]:.3f}" if r in ref else "-"
    if r in ref and bias is not None and bias != ref_bias:
      ratio += "*"
      unlike.add(label)
    line += f" {tps:12,.0f} {ratio:>6s}"
  print(line)
if unlike:
  print(f"(*: not like for like: the row's model.use_bias is not nanoGPT's bias={ref_bias} (NANOGPT_ARGS))")
print("(c: nanoGPT with torch.compile; eager: torch.compile failed, --compile=False)")
PY
}

parity_run() {  # parity_run NAME RUN EXTRA_OVERRIDES...: one 2000-step training; RUN is
  # off|fp8|fp8head|chunks|kernel|gelu (fp8: the MLP in FP8; fp8head: the head too; kernel: the fused
  # cross-entropy kernel, train.loss_kernel=pallas; gelu: the Mosaic GPU GELU-gradient kernel,
  # model.gelu_kernel=mosaic)
  # off: XLA's loss and GELU gradient, not auto's kernels
  local name=$1 run=$2 ovr=(--config.train.loss_kernel=xla --config.model.gelu_kernel=xla); shift 2
  case $run in  # a _seedN suffix sets every seed (init, data order, dropout) to N
    off*) ;;
    fp8head*) ovr+=(--config.model.fp8=True --config.model.fp8_head=True) ;;
    fp8*) ovr+=(--config.model.fp8=True) ;;
    chunks*) ovr+=(--config.train.loss_chunks=4) ;;
    kernel*) ovr=(--config.train.loss_kernel=pallas --config.model.gelu_kernel=xla) ;;
    gelu*) ovr=(--config.train.loss_kernel=xla --config.model.gelu_kernel=mosaic) ;;
  esac
  if [[ $run == *_seed* ]]; then
    local seed=${run##*_seed}
    ovr+=(--config.train.seed="$seed" --config.data.seed="$seed" --config.train.dropout_seed="$seed")
  fi
  rm -rf "/tmp/parity_${name}_$run"
  stage "${name}_$run" "${PARITY_LIMIT:-300}" -- $PY -m llm_jax.train --config="$PARITY_CONFIG" \
    --workdir="/tmp/parity_${name}_$run" --config.data.corpus="$SHK_TRAIN" \
    --config.data.val_corpus="$SHK_VAL" --config.data.cache_dir="/tmp/parity_cache_${name}_$run" \
    --config.train.steps="$PARITY_STEPS" --config.train.sample_every=0 \
    --config.train.checkpoint_every="$PARITY_STEPS" $PARITY_ARGS "$@" "${ovr[@]}"
  cp "/tmp/parity_${name}_$run/metrics.jsonl" "$OUT/${name}_$run.metrics.jsonl" 2>/dev/null
}

parity() {  # parity NAME EXTRA_OVERRIDES...: four 2000-step runs and their val-loss curves
  local name=$1; shift
  local runs=("off_seed0" "off_seed1" "fp8" "chunks") run
  shakespeare_data
  for run in "${runs[@]}"; do
    parity_run "$name" "$run" "$@"
  done
  $PY bench/parity_summary.py "$OUT" "$name" "${runs[@]}" | tee -a "$OUT/all.log"
}

parity_seeds() {  # SEEDS seeds each of off / fp8 / chunks, PARALLEL trainings at a time on the one GPU,
  # then a per-step check of the same switches from one start, float32 and bfloat16 compute (XLA
  # attention: cuDNN has no float32; the training step's attention dropout takes the XLA path anyway;
  # deterministic XLA ops, and the switches-off row twice: the second shows the run-to-run difference)
  local name=parity_seeds runs=() run s n=0
  shakespeare_data
  local g
  local s0=${SEED0:-0}
  for s in $(seq "$s0" $(( s0 + ${SEEDS:-4} - 1 ))); do
    for g in ${PARITY_GROUPS:-off fp8 chunks}; do runs+=("${g}_seed$s"); done
  done
  local frac
  frac=$(awk -v p="${PARALLEL:-4}" 'BEGIN { printf "%.2f", 0.9 / p }')
  local wave_start wave_s=0 started=()
  for run in "${runs[@]}"; do
    if [ $(( n % ${PARALLEL:-4} )) -eq 0 ]; then  # a new wave
      if [ $n -gt 0 ]; then wait; wave_s=$(( $(date +%s) - wave_start )); fi
      if [ -n "${PARITY_DEADLINE:-}" ] && [ $(( $(date +%s) - T0 + wave_s )) -gt "$PARITY_DEADLINE" ]; then
        echo "PARITY_DEADLINE ${PARITY_DEADLINE}s: the next wave (${wave_s}s last time) would end past it;" \
          "runs from $run on not started" | tee -a "$OUT/all.log"
        break
      fi
      wave_start=$(date +%s)
    fi
    XLA_PYTHON_CLIENT_MEM_FRACTION=$frac parity_run "$name" "$run" &
    started+=("$run")
    n=$(( n + 1 ))
  done
  wait
  $PY bench/parity_summary.py "$OUT" "$name" "${started[@]}" | tee -a "$OUT/all.log"
  local dt
  for dt in ${CHECK_DTYPES:-float32 bfloat16}; do
    stage "parity_steps_$dt" 300 XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" -- \
      $PY -m llm_jax.bench --config="$PARITY_CONFIG" \
      --config.data.corpus="$SHK_TRAIN" --config.data.val_corpus="$SHK_VAL" \
      --config.data.cache_dir=/tmp/parity_cache_steps \
      --config.model.dtype=$dt --config.model.attention=xla --config.train.loss_kernel=xla \
      --config.model.gelu_kernel=xla --warmup=0 --steps="${CHECK_STEPS:-200}" --json="/tmp/bench/parity_steps_$dt.json" \
      $PARITY_ARGS --variant='' --variant='' --variant='train.loss_chunks=4' --variant='model.fp8=True' \
      --variant='train.loss_kernel=pallas' --variant='model.gelu_kernel=mosaic'
    echo "per-step training losses, $dt compute (first row the reference):" | tee -a "$OUT/all.log"
    $PY bench/compare_losses.py "/tmp/bench/parity_steps_$dt.json" 2>&1 | tee -a "$OUT/all.log"
  done
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(speed kernels)
for s in "${stages[@]}"; do
  case "$s" in
    speed)
      rm -f "$OUT/nanogpt.jsonl" "$OUT/results.jsonl"
      nano=0
      have_nanogpt && nano=1
      for r in $(seq 1 "${ROUNDS:-2}"); do
        [ $nano = 1 ] && nanogpt_round $r
        llm_jax_round $r
      done
      table | tee -a "$OUT/all.log"  # every row: step ms, MFU, peak memory, last loss
      side_by_side_table ;;
    parity) parity parity ;;
    parity_bpe) parity parity_bpe --config.data.tokenizer.type=bpe --config.data.tokenizer.vocab_size=2048 ;;
    parity_seeds) parity_seeds ;;
    kernels)
      stage kernels 120 -- $PY bench/kernel_probe.py
      grep '^{' /tmp/bench/kernels.log | tee -a "$OUT/all.log" ;;
    *) echo "unknown stage $s (speed parity parity_bpe parity_seeds kernels)" >&2 ;;
  esac
done
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/all.log"
